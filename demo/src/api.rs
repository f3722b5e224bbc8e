//! The exchange's API on the edge host: a small real HTTP service answering JSON, the thing
//! the legitimate clients need and the attacker tries to take down. It runs as its own
//! process (`limiter-demo serve-api`) inside the edge namespace, so it competes for the CPU
//! like a real service would.
//!
//! Like a real gateway it has a finite capacity: [`API_WORKERS`] requests at a time, each
//! holding its worker for [`REQUEST_COST`] (the round trip to the matching engine and the risk
//! check a real ticker request waits for), so at most [`capacity_per_second`] requests a
//! second are answered. A request arriving while every worker is busy is refused at once with
//! 503, as a gateway sheds load rather than queue without bound. A flood that keeps the
//! workers busy thus takes the legitimate clients' share: the harm the limiter prevents.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use axum::{
    BoxError, Json, Router, error_handling::HandleErrorLayer, extract::State, http::StatusCode,
    routing::get,
};
use serde::Serialize;
use tokio::signal::unix::{SignalKind, signal};

/// The symbol the ticker quotes.
pub const SYMBOL: &str = "BTC-USD";
/// The path the clients request.
pub const TICKER_PATH: &str = "/api/v1/ticker";

/// Worker threads: one per core of the lab machine.
const WORKER_THREADS: usize = 2;

/// Ticker requests served at once.
pub const API_WORKERS: usize = 16;
/// What one ticker request costs its worker: a back-end round trip.
pub const REQUEST_COST: std::time::Duration = std::time::Duration::from_millis(10);

/// The most ticker requests a second the API answers.
pub fn capacity_per_second() -> u64 {
    (API_WORKERS as f64 / REQUEST_COST.as_secs_f64()) as u64
}

#[derive(Default)]
struct Market {
    /// Last price in cents; moves by a small random step on every quote.
    price_cents: AtomicI64,
    sequence: AtomicU64,
}

#[derive(Serialize)]
struct Ticker {
    symbol: &'static str,
    price: f64,
    sequence: u64,
    server_time_ms: u128,
}

async fn ticker(State(market): State<Arc<Market>>) -> Json<Ticker> {
    tokio::time::sleep(REQUEST_COST).await;
    let step = rand::random_range(-50..=50);
    let price_cents = market.price_cents.fetch_add(step, Ordering::Relaxed) + step;
    let sequence = market.sequence.fetch_add(1, Ordering::Relaxed) + 1;
    let server_time_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    Json(Ticker {
        symbol: SYMBOL,
        price: price_cents as f64 / 100.0,
        sequence,
        server_time_ms,
    })
}

async fn healthz() -> &'static str {
    "ok"
}

/// Serves the API on every address of `listen` until SIGTERM or SIGINT.
pub fn serve(listen: &[SocketAddr]) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKER_THREADS)
        .enable_all()
        .build()
        .context("start the async runtime")?;
    runtime.block_on(serve_all(listen))
}

async fn serve_all(listen: &[SocketAddr]) -> Result<()> {
    let market = Arc::new(Market {
        price_cents: AtomicI64::new(6_400_000),
        sequence: AtomicU64::new(0),
    });
    // The ticker has API_WORKERS workers; a request finding none free is shed with 503.
    let workers = tower::ServiceBuilder::new()
        .layer(HandleErrorLayer::new(|_: BoxError| async {
            (StatusCode::SERVICE_UNAVAILABLE, "overloaded\n")
        }))
        .load_shed()
        .concurrency_limit(API_WORKERS);
    let app = Router::new()
        .route(TICKER_PATH, get(ticker).layer(workers))
        .route("/healthz", get(healthz))
        .with_state(market);

    let mut servers = tokio::task::JoinSet::new();
    for &addr in listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listen on {addr}"))?;
        let app = app.clone();
        servers.spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop_signal())
                .await
                .with_context(|| format!("serve on {addr}"))
        });
    }
    eprintln!(
        "serving the API on {}",
        listen
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    while let Some(result) = servers.join_next().await {
        result.context("the server task failed")??;
    }
    Ok(())
}

async fn stop_signal() {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without handlers the default actions still stop the process.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
