//! `runestone-mock`: an offline, OpenAI-shaped LLM provider for Runestone's
//! tests, benchmarks and demo. Deterministic, fast, and scriptable through a
//! control API (`/_mock/...`) so tests can inject failures and inspect exactly
//! what the gateway forwarded. Its command line, endpoints, control API and
//! faults are documented in this crate's README.md.
//!
//! # Layout
//!
//! | module | owns |
//! |---|---|
//! | `main` | the command line and start-up |
//! | [`state`] | configuration, counters, the request journal |
//! | [`faults`] | fault objects, their parsing and queue |
//! | [`requests`] | request formats, routing, token estimates (pure) |
//! | [`bodies`] | response bodies and stream events (pure) |
//! | [`responses`] | the Responses API and its stored responses |
//! | [`media`] | moderations, images and audio |
//! | [`transport`] | reading bodies, pauses, writing replies |
//! | [`app`] | serving one request: control API, faults, streams |
#![forbid(unsafe_code)]

mod app;
mod bodies;
mod faults;
mod media;
mod requests;
mod responses;
mod state;
#[cfg(test)]
mod tests;
mod transport;

use app::*;
use bodies::*;
use faults::*;
use media::*;
use requests::*;
use responses::*;
use state::*;
use transport::*;

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use clap::Parser;
use http::{HeaderMap, Method};
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{Server, ShutdownWatch};
use pingora::services::listening::Service;
use pingora::ErrorType;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Largest request body accepted (larger bodies get a 413 and a closed connection).
pub(crate) const MAX_BODY_BYTES: usize = 256 << 20;
/// How many API requests `GET /_mock/requests` remembers.
pub(crate) const RECORD_LIMIT: usize = 200;
/// Reply length when the request sets neither `mock_tokens` nor a smaller cap.
pub(crate) const DEFAULT_COMPLETION_TOKENS: u64 = 16;
/// Upper bound for `mock_tokens`.
pub(crate) const MAX_MOCK_TOKENS: u64 = 100_000;
/// Stall duration when a stall fault does not say.
pub(crate) const DEFAULT_STALL_MS: u64 = 60_000;
/// Dimensions of the mock embeddings.
pub(crate) const EMBEDDING_DIMS: usize = 8;
/// Model reported when a request names none.
pub(crate) const DEFAULT_MODEL: &str = "mock-model";
/// Paths with a dedicated lock-free counter in the stats.
pub(crate) const KNOWN_PATHS: [&str; 4] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/models",
];
/// Distinct unknown paths tracked individually before they are lumped together.
pub(crate) const MAX_OTHER_PATHS: usize = 1024;

/// Command line of `runestone-mock`.
#[derive(Parser, Debug)]
#[command(
    name = "runestone-mock",
    version,
    about = "Offline OpenAI-shaped LLM provider for Runestone tests, benchmarks and demos"
)]
struct Cli {
    /// Address to listen on, e.g. 127.0.0.1:18080 (port 0 picks a free port).
    #[arg(long)]
    listen: String,
    /// Fixed delay in milliseconds before the response headers of every API request.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Streaming pace in tokens per second (0 = as fast as possible).
    #[arg(long, default_value_t = 0)]
    tokens_per_second: u64,
    /// Require this API key (Authorization: Bearer, api-key or x-api-key).
    #[arg(long)]
    api_key: Option<String>,
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Make each streamed token the CLOCK_MONOTONIC time, in microseconds,
    /// at which it was written (for measuring chunk forwarding delay).
    #[arg(long)]
    stamp_chunks: bool,
    /// Answer 400 with an empty body to API requests whose `x-request-id`
    /// is missing or not a UUID (as llama-cpp-python's server does).
    #[arg(long)]
    require_uuid_request_id: bool,
}

/// Resolves `--listen`, checks it can be bound, and replaces port 0 by a free port.
fn resolve_listen(listen: &str) -> Result<SocketAddr, String> {
    let addr = listen
        .to_socket_addrs()
        .map_err(|e| format!("invalid --listen {listen:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("--listen {listen:?} resolves to no address"))?;
    let probe = TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let bound = probe
        .local_addr()
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    Ok(bound)
}

/// Address to connect to in order to see whether `addr` is accepting.
fn probe_target(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    }
}

/// Prints the readiness line once the listener accepts connections.
fn announce_when_ready(addr: SocketAddr) {
    std::thread::spawn(move || {
        let target = probe_target(addr);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if TcpStream::connect_timeout(&target, Duration::from_millis(200)).is_ok() {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "runestone-mock listening on {addr}");
                let _ = out.flush();
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        tracing::error!("listener on {addr} never became ready");
    });
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();

    let addr = match resolve_listen(&cli.listen) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("runestone-mock: {e}");
            std::process::exit(2);
        }
    };
    let threads = cli.threads.max(1);

    let mut conf = match ServerConf::new() {
        Some(c) => c,
        None => {
            eprintln!("runestone-mock: cannot build the default server configuration");
            std::process::exit(1);
        }
    };
    conf.threads = threads;
    // SIGTERM should stop a test fixture promptly, not after pingora's 5 minute grace period
    conf.grace_period_seconds = Some(0);
    conf.graceful_shutdown_timeout_seconds = Some(0);
    let mut server = Server::new_with_opt_and_conf(None::<Opt>, conf);
    server.bootstrap();

    let app = MockApp {
        cfg: MockConfig {
            api_key: cli.api_key,
            tokens_per_second: cli.tokens_per_second,
            latency_ms: cli.latency_ms,
            stamp_chunks: cli.stamp_chunks,
            require_uuid_request_id: cli.require_uuid_request_id,
        },
        state: MockState::new(cli.latency_ms),
    };
    let mut service = Service::new("runestone-mock".to_owned(), app);
    service.threads = Some(threads);
    service.add_tcp(&addr.to_string());
    server.add_service(service);

    announce_when_ready(addr);
    server.run_forever();
}
