//! The exchange's legitimate clients: each sends `GET /api/v1/ticker` at a steady rate, each
//! request on a new TCP connection from the client's own source address (as REST clients
//! behind a load balancer or NAT commonly do). A new connection per request makes every
//! request pay for the handshake, so a SYN flood or a limiter that wrongly drops the client
//! shows up at once as failed or slow requests.
//!
//! Requests are sent open-loop: on schedule whether or not earlier ones have answered, so a
//! stalled server shows up as failures and latency instead of silently fewer requests.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use serde::Serialize;
use tokio::{io::BufReader, net::TcpSocket, task::JoinSet};

use crate::{
    api, http,
    lab::{self, CLIENT_NS},
    netns,
};

/// A request that has not fully answered within this time counts as failed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// A brand-new client's first request may take this long: room for one SYN retransmission
/// (Linux resends after 1 s), the bound a retail user opening the app would tolerate.
pub const NEWCOMER_TIMEOUT: Duration = Duration::from_millis(1500);
/// Brand-new clients connect this far into each second, away from the per-second readings.
const NEWCOMER_OFFSET: Duration = Duration::from_millis(300);
/// Requests per second of each client in normal operation.
pub const NORMAL_RATE: u32 = 5;

/// What a client is to the exchange.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// An ordinary API user, under the default limit.
    Retail,
    /// A partner that sometimes sends far more: the operator allowlists it.
    Partner,
    /// In the `market-makers` class, with its own, higher limit.
    MarketMaker,
}

/// One legitimate client.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct ClientSpec {
    pub name: &'static str,
    pub source: IpAddr,
    pub role: Role,
}

/// Every legitimate client, indexed by [`RequestRecord::client`].
pub const CLIENTS: [ClientSpec; 4] = [
    ClientSpec {
        name: "retail-v4",
        source: IpAddr::V4(lab::RETAIL_V4),
        role: Role::Retail,
    },
    ClientSpec {
        name: "partner",
        source: IpAddr::V4(lab::PARTNER_V4),
        role: Role::Partner,
    },
    ClientSpec {
        name: "market-maker",
        source: IpAddr::V4(lab::MARKET_MAKER_V4),
        role: Role::MarketMaker,
    },
    ClientSpec {
        name: "retail-v6",
        source: IpAddr::V6(lab::RETAIL_V6),
        role: Role::Retail,
    },
];

/// Index of the partner in [`CLIENTS`].
pub const PARTNER: usize = 1;
/// Index of the market maker in [`CLIENTS`].
pub const MARKET_MAKER: usize = 2;

/// How a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// HTTP 200 with the expected JSON, within the timeout.
    Ok,
    /// No complete answer within [`REQUEST_TIMEOUT`].
    Timeout,
    /// Refused, reset, or a wrong answer.
    Error,
}

/// One request of one client.
#[derive(Clone, Copy, Debug)]
pub struct RequestRecord {
    pub client: usize,
    /// When it was sent, in seconds since the demo's start.
    pub started: f64,
    /// When it ended (answer, error or timeout), in seconds since the demo's start.
    pub ended: f64,
    pub outcome: Outcome,
}

impl RequestRecord {
    /// Time to a full answer, in milliseconds.
    pub fn latency_ms(&self) -> f64 {
        (self.ended - self.started) * 1000.0
    }
}

/// The first request of a client the limiter has never seen, from an address of its own.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct NewcomerRecord {
    pub source: Ipv4Addr,
    /// When it was sent, in seconds since the demo's start.
    pub started: f64,
    pub ended: f64,
    pub outcome: Outcome,
}

impl NewcomerRecord {
    pub fn latency_ms(&self) -> f64 {
        (self.ended - self.started) * 1000.0
    }
}

/// Records of both kinds that ended since the last [`LegitClients::take_new`].
#[derive(Default)]
pub struct Completed {
    pub requests: Vec<RequestRecord>,
    pub newcomers: Vec<NewcomerRecord>,
}

/// Shared between the phase runner and the clients' runtime.
#[derive(Default)]
struct Shared {
    records: Mutex<Vec<RequestRecord>>,
    newcomers: Mutex<Vec<NewcomerRecord>>,
    /// Whether a brand-new client connects each second.
    newcomers_on: AtomicBool,
    stop: AtomicBool,
}

/// The running clients: a thread in the client namespace with an async runtime that sends
/// every client's requests, and once a second while switched on, a brand-new client's.
pub struct LegitClients {
    rates: Arc<[AtomicU32; CLIENTS.len()]>,
    shared: Arc<Shared>,
    handle: Option<thread::JoinHandle<Result<()>>>,
    /// How many records of each kind [`LegitClients::take_new`] has handed out.
    seen: (usize, usize),
}

impl LegitClients {
    /// Starts every client at [`NORMAL_RATE`]. Times are measured from `epoch`.
    pub fn start(epoch: Instant) -> Result<Self> {
        let rates = Arc::new(CLIENTS.map(|_| AtomicU32::new(NORMAL_RATE)));
        let shared = Arc::new(Shared::default());
        let handle = {
            let (rates, shared) = (rates.clone(), shared.clone());
            netns::spawn_in(CLIENT_NS, "legit-clients", move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("start the clients' async runtime")?;
                // A current-thread runtime runs every task on this thread, so every socket
                // is made inside the client namespace.
                runtime.block_on(run_clients(epoch, rates, shared));
                Ok(())
            })?
        };
        Ok(Self {
            rates,
            shared,
            handle: Some(handle),
            seen: (0, 0),
        })
    }

    /// Starts or stops sending a brand-new client's first request once a second.
    pub fn set_newcomers(&self, on: bool) {
        self.shared.newcomers_on.store(on, Ordering::Relaxed);
    }

    /// Changes a client's request rate from now on.
    pub fn set_rate(&self, client: usize, per_second: u32) {
        self.rates[client].store(per_second, Ordering::Relaxed);
    }

    /// The records that ended since the last call.
    pub fn take_new(&mut self) -> Result<Completed> {
        let requests = lock(&self.shared.records)?;
        let newcomers = lock(&self.shared.newcomers)?;
        let completed = Completed {
            requests: requests[self.seen.0..].to_vec(),
            newcomers: newcomers[self.seen.1..].to_vec(),
        };
        self.seen = (requests.len(), newcomers.len());
        Ok(completed)
    }

    /// Stops sending, waits for the requests in flight, and returns every record.
    pub fn finish(mut self) -> Result<Completed> {
        self.stop_and_join()?;
        Ok(Completed {
            requests: lock(&self.shared.records)?.clone(),
            newcomers: lock(&self.shared.newcomers)?.clone(),
        })
    }

    fn stop_and_join(&mut self) -> Result<()> {
        self.shared.stop.store(true, Ordering::Relaxed);
        match self.handle.take() {
            Some(handle) => netns::join(handle),
            None => Ok(()),
        }
    }
}

impl Drop for LegitClients {
    fn drop(&mut self) {
        // On an error path: stop the clients before the lab's namespaces go away.
        let _ = self.stop_and_join();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>> {
    mutex.lock().map_err(|_| anyhow!("a client task panicked"))
}

async fn run_clients(epoch: Instant, rates: Arc<[AtomicU32; CLIENTS.len()]>, shared: Arc<Shared>) {
    let mut schedulers = JoinSet::new();
    for client in 0..CLIENTS.len() {
        let (rates, shared) = (rates.clone(), shared.clone());
        schedulers.spawn(schedule(client, epoch, rates, shared));
    }
    schedulers.spawn(newcomers(epoch, shared));
    while schedulers.join_next().await.is_some() {}
}

/// Once a second while switched on, a client from an address the limiter has never seen
/// opens a connection and sends one request: a retail user opening the app.
async fn newcomers(epoch: Instant, shared: Arc<Shared>) {
    let mut addresses = lab::newcomer_addresses();
    let mut in_flight = JoinSet::new();
    let mut next = tokio::time::Instant::now() + NEWCOMER_OFFSET;
    while !shared.stop.load(Ordering::Relaxed) && !crate::shutdown::requested() {
        tokio::time::sleep_until(next).await;
        next += Duration::from_secs(1);
        if !shared.newcomers_on.load(Ordering::Relaxed) {
            continue;
        }
        // Past the end of the pool the addresses are known ones: stop rather than pretend.
        let Some(source) = addresses.next() else {
            continue;
        };
        let shared = shared.clone();
        in_flight.spawn(async move {
            let started = epoch.elapsed().as_secs_f64();
            let outcome = match tokio::time::timeout(
                NEWCOMER_TIMEOUT,
                request_from(IpAddr::V4(source)),
            )
            .await
            {
                Ok(Ok(())) => Outcome::Ok,
                Ok(Err(_)) => Outcome::Error,
                Err(_) => Outcome::Timeout,
            };
            let record = NewcomerRecord {
                source,
                started,
                ended: epoch.elapsed().as_secs_f64(),
                outcome,
            };
            if let Ok(mut records) = shared.newcomers.lock() {
                records.push(record);
            }
        });
        while in_flight.try_join_next().is_some() {}
    }
    while in_flight.join_next().await.is_some() {}
}

/// Sends one client's requests on schedule until told to stop, then waits for those in flight.
async fn schedule(
    client: usize,
    epoch: Instant,
    rates: Arc<[AtomicU32; CLIENTS.len()]>,
    shared: Arc<Shared>,
) {
    let mut in_flight = JoinSet::new();
    // Spread the clients' first requests over the first interval.
    let mut next = tokio::time::Instant::now()
        + Duration::from_millis(37 * client as u64 % 200)
        + Duration::from_millis(1);
    while !shared.stop.load(Ordering::Relaxed) && !crate::shutdown::requested() {
        tokio::time::sleep_until(next).await;
        let rate = rates[client].load(Ordering::Relaxed).max(1);
        let shared = shared.clone();
        in_flight.spawn(async move {
            let started = epoch.elapsed().as_secs_f64();
            let source = CLIENTS[client].source;
            let outcome = match tokio::time::timeout(REQUEST_TIMEOUT, request_from(source)).await {
                Ok(Ok(())) => Outcome::Ok,
                Ok(Err(_)) => Outcome::Error,
                Err(_) => Outcome::Timeout,
            };
            let record = RequestRecord {
                client,
                started,
                ended: epoch.elapsed().as_secs_f64(),
                outcome,
            };
            if let Ok(mut records) = shared.records.lock() {
                records.push(record);
            }
        });
        // Reap the finished ones so the set stays small.
        while in_flight.try_join_next().is_some() {}
        next += Duration::from_secs(1) / rate;
        // After a stall (the whole machine busy), carry on from now instead of catching up
        // with a burst the client would never send.
        let now = tokio::time::Instant::now();
        if next + Duration::from_secs(1) < now {
            next = now;
        }
    }
    while in_flight.join_next().await.is_some() {}
}

/// One request on a new connection from `source`.
async fn request_from(source: IpAddr) -> Result<()> {
    let (socket, target) = match source {
        IpAddr::V4(_) => (
            TcpSocket::new_v4(),
            SocketAddr::new(lab::EDGE_V4.into(), lab::API_PORT),
        ),
        IpAddr::V6(_) => (
            TcpSocket::new_v6(),
            SocketAddr::new(lab::EDGE_V6.into(), lab::API_PORT),
        ),
    };
    let socket = socket.context("make a socket")?;
    socket
        .bind(SocketAddr::new(source, 0))
        .with_context(|| format!("bind {source}"))?;
    let stream = socket.connect(target).await.context("connect")?;
    let mut stream = BufReader::new(stream);
    let response = http::get(
        &mut stream,
        &target.to_string(),
        api::TICKER_PATH,
        http::Connection::Close,
    )
    .await?;
    check_ticker(&response)
}

/// A real answer: status 200 and a JSON quote for the right symbol.
fn check_ticker(response: &http::Response) -> Result<()> {
    if response.status != 200 {
        bail!("status {}", response.status);
    }
    let quote: serde_json::Value =
        serde_json::from_slice(&response.body).context("the body is not JSON")?;
    if quote.get("symbol").and_then(|s| s.as_str()) != Some(api::SYMBOL) {
        bail!("unexpected quote {quote}");
    }
    Ok(())
}

/// Waits until the API answers from the client namespace, or fails after `timeout`.
pub fn wait_for_api(timeout: Duration) -> Result<()> {
    netns::run_in(CLIENT_NS, move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("start an async runtime")?;
        runtime.block_on(async {
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                let last =
                    match tokio::time::timeout(REQUEST_TIMEOUT, request_from(CLIENTS[0].source))
                        .await
                    {
                        Ok(Ok(())) => return Ok(()),
                        Ok(Err(e)) => e,
                        Err(_) => anyhow!("no answer within {REQUEST_TIMEOUT:?}"),
                    };
                if tokio::time::Instant::now() >= deadline || crate::shutdown::requested() {
                    return Err(last.context("the API service did not answer"));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    })
}
