//! `runestone-mock`: an offline, OpenAI-shaped LLM provider.
//!
//! The mock stands in for a real provider in Runestone's integration tests,
//! benchmarks and demo. It is deterministic (the same request always produces
//! the same answer), fast (HTTP/1.1 keep-alive, no per-request logging, only
//! atomics plus one short mutex section per request on the hot path), and
//! scriptable through a small control API so tests can inject failures and
//! inspect exactly what the gateway forwarded.
//!
//! It is a standalone binary: it does not depend on the `runestone` library.
//!
//! # Command line
//!
//! ```text
//! runestone-mock --listen ADDR [--latency-ms N] [--tokens-per-second N] [--api-key KEY] [--threads N]
//! ```
//!
//! * `--listen ADDR`: socket address, e.g. `127.0.0.1:18080`. Port `0` picks a
//!   free port. Once the socket accepts connections the mock prints exactly one
//!   line, `runestone-mock listening on ADDR`, to stdout (flushed).
//! * `--latency-ms N` (default 0): fixed delay before the response headers of
//!   every API request (never applied to control endpoints).
//! * `--tokens-per-second N` (default 0 = unpaced): streaming pace, one token
//!   per SSE event.
//! * `--api-key KEY`: when set, API requests must carry
//!   `Authorization: Bearer KEY`, `api-key: KEY` (Azure style) or
//!   `x-api-key: KEY` (Anthropic style); otherwise they get a 401 with
//!   `{"error":{"message":"Incorrect API key provided","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}`.
//! * `--threads N` (default 1): worker threads.
//!
//! `RUST_LOG` controls diagnostics on stderr (default `warn`).
//!
//! # API endpoints
//!
//! Every request that is not a control endpoint is an *API request*: it is
//! counted, recorded, subject to `--latency-ms`, `--api-key` and faults, and its
//! response carries
//! `x-mock-request-bytes` (request body length), `x-mock-body-sha256` (hex
//! SHA-256 of the request body), `x-mock-model` (model received, when there is
//! one and it is a valid header value) and `x-request-id` (`req_mock_N`).
//!
//! * `POST /v1/chat/completions`: `model`, `messages`, `max_tokens` /
//!   `max_completion_tokens`, `stream`, `stream_options.include_usage`, and the
//!   mock-only `mock_tokens` (default reply length, up to 100000).
//!   The reply is `N` words `"tok0 tok1 ... tok{N-1}"` where
//!   `N = min(mock_tokens or 16, max_tokens/max_completion_tokens)`;
//!   `finish_reason` is `"length"` when the cap cut the reply, else `"stop"`.
//!   `prompt_tokens = ceil(bytes of all string content / 4) + 4 per message`
//!   (at least 1); text parts of array content count too.
//!   Streaming (`"stream": true`) sends `data: {json}\n\n` events, one HTTP
//!   chunk each: a role event (`{"role":"assistant","content":""}`), one event
//!   per token (`{"content":"tokI "}`), a finish event (empty delta plus
//!   `finish_reason`), then, only with `include_usage`, a `"choices": []`
//!   event carrying `usage` (every other event then has `"usage": null`), then
//!   `data: [DONE]`.
//! * `POST /v1/completions`: legacy `prompt` (string, array of strings, or
//!   token arrays); `text_completion` objects, streaming alike (no role event).
//!   `prompt_tokens = ceil(string bytes / 4) + number of literal token ids`,
//!   at least 1.
//! * `POST /v1/embeddings`: `input` string, array of strings, token array or
//!   array of token arrays; one 8-dimensional unit vector per input,
//!   deterministic from the input (SHA-256 based). `encoding_format: "base64"`
//!   returns little-endian `f32` bytes in base64, as OpenAI does.
//! * `GET /v1/models` and `GET /v1/models/{id}`: a single `mock-model` entry /
//!   the requested id.
//! * `POST /v1/messages`: the Anthropic Messages API (JSON and SSE with
//!   usage; `max_tokens` required; with `tools`, a `tool_use` of the first).
//! * Azure-style paths `/openai/deployments/{deployment}/chat/completions`,
//!   `.../completions` and `.../embeddings` behave like the `/v1` ones; the
//!   deployment is the model when the body has none.
//! * Anything else: 404 `{"error":{...,"code":"unknown_url"}}`. A body that is
//!   not JSON: 400 with code `invalid_json`; JSON of the wrong shape: 400 with
//!   code `invalid_request`. Bodies are read whole (up to 256 MiB, beyond
//!   that 413 and the connection is closed).
//!
//! Order of processing for an API request: read the whole body, count and
//! record it, take a fault, wait the latency, apply the fault (status, raw
//! error, drop, pre-header stall), check the API key, then answer.
//!
//! # Control endpoints
//!
//! Never affected by faults, the API key or latency, and never counted.
//!
//! * `GET /health`: `200 ok`.
//! * `GET /_mock/stats`: `{"requests", "by_path": {path: n}, "prompt_tokens",
//!   "completion_tokens", "disconnects", "faults_pending", "latency_ms"}`.
//!   `requests` counts all API requests (faulted, rejected and unknown paths
//!   included); `by_path` uses the path without query string.
//!   `prompt_tokens` adds a response's prompt tokens once its 200 headers were
//!   written; `completion_tokens` adds tokens actually delivered (per event for
//!   streams, on completion of the body for non-streamed responses);
//!   `disconnects` counts responses whose client went away before the end
//!   (write failure, or connection closed during a latency/stall/pacing pause).
//! * `GET /_mock/requests`: JSON array of the last (up to) 200 API requests,
//!   oldest first: `{"method", "path", "query", "headers": {lowercase name:
//!   value, repeated headers joined with ", "}, "body_bytes", "body_sha256",
//!   "model"}`.
//! * `POST /_mock/reset`: clears stats, recorded requests and faults, and
//!   restores `--latency-ms`; answers `{"ok":true}`.
//! * `GET /_mock/faults`: the pending fault queue and the current latency.
//! * `POST /_mock/faults`: a fault object, or an array of them (applied in
//!   order, all or nothing); answers `{"ok":true}`, or 400 for bad input
//!   (unknown fields are rejected). Faults are appended to a FIFO queue; each
//!   API request takes one use of the first queued fault whose optional
//!   `path` matches its path; a fault is removed once its `count` (default 1)
//!   is used up. Fault objects:
//!   * `{"status": 503, "count": 3}`: answer that status with an OpenAI-shaped
//!     error (`server_error` for 5xx; `rate_limit_error` / `rate_limit_exceeded`
//!     plus `retry-after: 1` for 429; `invalid_request_error` otherwise).
//!     Optional `"retry_after": S` sets/overrides `retry-after`.
//!   * `{"error_body": "raw text", "status": 500}`: that exact body
//!     (`text/plain`, or `"content_type"`: `application/json` or
//!     `text/event-stream`), status default 500, optional `retry_after`.
//!   * `{"disconnect_after_chunks": K}`: streams send the headers, the role
//!     event (chat only) and `min(K, N)` token events, then the connection is
//!     closed (no finish event, no last chunk, no `[DONE]`); non-streamed
//!     responses (errors included) send headers with the full
//!     `content-length` and half the body, then close. Not counted as a
//!     client disconnect.
//!   * `{"stall_after_chunks": K, "stall_ms": M}`: streams pause M ms
//!     (default 60000) after K token events (K >= N: before the finish
//!     event), then finish normally; K = 0, and every non-streamed request,
//!     pause before the response headers instead. `stall_ms` alone means K = 0.
//!   * `{"drop_connection": true}`: close the connection without any response.
//!   * `{"headers": {"set-cookie": "a=b"}}`: answer normally, with these extra
//!     response headers (hostile-provider tests).
//!   * `{"echo_key": true}`: a provider that echoes the credential it was
//!     sent (the `Authorization` bearer key, `x-api-key` or `api-key`): in
//!     the `x-request-id`, `openai-version`, `openai-processing-ms` and
//!     `cache-control` headers; in a JSON answer as `system_fingerprint`
//!     (raw) and `echo_escaped` (every character `\uXXXX`-escaped); in a
//!     stream as two extra events after the role event, one with the raw key
//!     written in two pieces split mid-key (a short pause between them) and
//!     one escaped; in an error answer's message.
//!   * `{"no_usage": true}`: answer normally but report no usage (no `usage`
//!     in JSON, `include_usage` ignored in streams), like some
//!     OpenAI-compatible servers.
//!   * `{"latency_ms": M}`: set the fixed latency for all later API requests
//!     (until reset); not queued, may be combined with one of the above.
//!   * `"path": "/v1/chat/completions"` (optional on any queued fault): only
//!     requests to that exact path take it.
#![forbid(unsafe_code)]

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
const MAX_BODY_BYTES: usize = 256 << 20;
/// How many API requests `GET /_mock/requests` remembers.
const RECORD_LIMIT: usize = 200;
/// Reply length when the request sets neither `mock_tokens` nor a smaller cap.
const DEFAULT_COMPLETION_TOKENS: u64 = 16;
/// Upper bound for `mock_tokens`.
const MAX_MOCK_TOKENS: u64 = 100_000;
/// Stall duration when a stall fault does not say.
const DEFAULT_STALL_MS: u64 = 60_000;
/// Dimensions of the mock embeddings.
const EMBEDDING_DIMS: usize = 8;
/// Model reported when a request names none.
const DEFAULT_MODEL: &str = "mock-model";
/// Paths with a dedicated lock-free counter in the stats.
const KNOWN_PATHS: [&str; 4] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/models",
];
/// Distinct unknown paths tracked individually before they are lumped together.
const MAX_OTHER_PATHS: usize = 1024;

// ---------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------

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
}

// ---------------------------------------------------------------------------
// Shared state
// ---------------------------------------------------------------------------

/// Immutable settings from the command line.
#[derive(Debug, Clone)]
struct MockConfig {
    /// Required API key, if any.
    api_key: Option<String>,
    /// Streaming pace; 0 means unpaced.
    tokens_per_second: u64,
    /// Latency restored by `POST /_mock/reset`.
    latency_ms: u64,
    /// Streamed tokens carry their write time (`--stamp-chunks`).
    stamp_chunks: bool,
}

/// Counters behind `GET /_mock/stats`.
#[derive(Debug, Default)]
struct Stats {
    /// Total API requests.
    requests: AtomicU64,
    /// Per-path counters for [`KNOWN_PATHS`].
    known: [AtomicU64; KNOWN_PATHS.len()],
    /// Counters for every other path (cold path).
    other: Mutex<HashMap<String, u64>>,
    /// Prompt tokens of responses whose 200 headers were written.
    prompt_tokens: AtomicU64,
    /// Completion tokens actually delivered.
    completion_tokens: AtomicU64,
    /// Responses abandoned because the client went away.
    disconnects: AtomicU64,
}

impl Stats {
    /// Counts one API request to `path`.
    fn count_request(&self, path: &str) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if let Some(i) = KNOWN_PATHS.iter().position(|p| *p == path) {
            self.known[i].fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut other = lock(&self.other);
        if let Some(n) = other.get_mut(path) {
            *n += 1;
        } else if other.len() < MAX_OTHER_PATHS {
            other.insert(path.to_owned(), 1);
        } else {
            *other.entry("(other)".to_owned()).or_insert(0) += 1;
        }
    }

    /// Zeroes every counter.
    fn reset(&self) {
        self.requests.store(0, Ordering::Relaxed);
        for k in &self.known {
            k.store(0, Ordering::Relaxed);
        }
        lock(&self.other).clear();
        self.prompt_tokens.store(0, Ordering::Relaxed);
        self.completion_tokens.store(0, Ordering::Relaxed);
        self.disconnects.store(0, Ordering::Relaxed);
    }

    /// Counts one client that went away mid-response.
    fn disconnect(&self) {
        self.disconnects.fetch_add(1, Ordering::Relaxed);
    }

    /// `by_path` object with the non-zero counters.
    fn by_path(&self) -> serde_json::Map<String, Value> {
        let mut map = serde_json::Map::new();
        for (path, n) in KNOWN_PATHS.iter().zip(&self.known) {
            let n = n.load(Ordering::Relaxed);
            if n > 0 {
                map.insert((*path).to_owned(), json!(n));
            }
        }
        for (path, n) in lock(&self.other).iter() {
            map.insert(path.clone(), json!(n));
        }
        map
    }
}

/// One API request as seen by the mock (no body copy: length and hash only).
#[derive(Debug, Clone)]
struct RecordedRequest {
    /// Request method.
    method: Method,
    /// URI path without query.
    path: String,
    /// Query string, if any.
    query: Option<String>,
    /// All request headers as received.
    headers: HeaderMap,
    /// Request body length.
    body_bytes: usize,
    /// SHA-256 of the request body.
    body_sha256: [u8; 32],
    /// Model named by the request (body `model`, or Azure deployment).
    model: Option<String>,
}

impl RecordedRequest {
    /// JSON shape served by `GET /_mock/requests`.
    fn to_json(&self) -> Value {
        let mut headers = serde_json::Map::new();
        for (name, value) in &self.headers {
            let value = String::from_utf8_lossy(value.as_bytes());
            match headers.get_mut(name.as_str()) {
                Some(Value::String(existing)) => {
                    existing.push_str(", ");
                    existing.push_str(&value);
                }
                _ => {
                    headers.insert(name.as_str().to_owned(), Value::String(value.into_owned()));
                }
            }
        }
        json!({
            "method": self.method.as_str(),
            "path": self.path,
            "query": self.query,
            "headers": headers,
            "body_bytes": self.body_bytes,
            "body_sha256": hex::encode(self.body_sha256),
            "model": self.model,
        })
    }
}

/// A misbehaviour injected through `POST /_mock/faults`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Fault {
    /// Answer this status with an OpenAI-shaped error body.
    Status {
        /// HTTP status.
        status: u16,
        /// Explicit `retry-after` seconds.
        retry_after: Option<u64>,
    },
    /// Answer this status with this exact body.
    RawError {
        /// HTTP status.
        status: u16,
        /// Raw body.
        body: String,
        /// Its `content-type`.
        content_type: &'static str,
        /// Explicit `retry-after` seconds.
        retry_after: Option<u64>,
    },
    /// Close the connection after this many token events (half body when not streaming).
    Disconnect {
        /// Token events sent before closing.
        after_chunks: u64,
    },
    /// Pause after this many token events (before headers when 0 or not streaming).
    Stall {
        /// Token events sent before the pause.
        after_chunks: u64,
        /// Pause length.
        stall_ms: u64,
    },
    /// Close the connection without answering.
    DropConnection,
    /// Answer normally, with these extra response headers.
    Headers(Vec<(String, String)>),
    /// Answer normally but report no usage, like servers that ignore
    /// `stream_options.include_usage`.
    NoUsage,
    /// Echo the request's credential in headers and body (hostile provider).
    EchoKey,
}

/// A queued fault with its remaining uses.
#[derive(Debug, Clone, PartialEq, Eq)]
struct QueuedFault {
    /// What to do.
    fault: Fault,
    /// Requests still to be affected.
    remaining: u32,
    /// Only requests to this exact path take the fault.
    path: Option<String>,
}

impl QueuedFault {
    /// JSON shape served by `GET /_mock/faults`.
    fn to_json(&self) -> Value {
        let mut v = match &self.fault {
            Fault::Status {
                status,
                retry_after,
            } => json!({"status": status, "retry_after": retry_after}),
            Fault::RawError {
                status,
                body,
                content_type,
                retry_after,
            } => {
                json!({"status": status, "error_body": body, "content_type": content_type, "retry_after": retry_after})
            }
            Fault::Disconnect { after_chunks } => json!({"disconnect_after_chunks": after_chunks}),
            Fault::Stall {
                after_chunks,
                stall_ms,
            } => json!({"stall_after_chunks": after_chunks, "stall_ms": stall_ms}),
            Fault::DropConnection => json!({"drop_connection": true}),
            Fault::NoUsage => json!({"no_usage": true}),
            Fault::EchoKey => json!({"echo_key": true}),
            Fault::Headers(headers) => json!({"headers": headers
                .iter()
                .cloned()
                .collect::<std::collections::BTreeMap<String, String>>()}),
        };
        v["count"] = json!(self.remaining);
        v["path"] = json!(self.path);
        v
    }
}

/// FIFO of pending faults.
#[derive(Debug, Default)]
struct FaultQueue {
    /// Pending faults, oldest first.
    entries: VecDeque<QueuedFault>,
}

impl FaultQueue {
    /// Appends a fault (ignored when it has no remaining uses).
    fn push(&mut self, fault: QueuedFault) {
        if fault.remaining > 0 {
            self.entries.push_back(fault);
        }
    }

    /// Takes one use of the first fault applicable to `path`.
    fn take(&mut self, path: &str) -> Option<Fault> {
        let idx = self
            .entries
            .iter()
            .position(|f| f.path.as_deref().is_none_or(|p| p == path))?;
        let entry = &mut self.entries[idx];
        entry.remaining -= 1;
        let fault = entry.fault.clone();
        if entry.remaining == 0 {
            self.entries.remove(idx);
        }
        Some(fault)
    }

    /// Total remaining uses.
    fn pending(&self) -> u64 {
        self.entries.iter().map(|f| u64::from(f.remaining)).sum()
    }

    /// Forgets every fault.
    fn clear(&mut self) {
        self.entries.clear();
    }
}

/// Everything the mock remembers between requests.
#[derive(Debug)]
struct MockState {
    /// Counters.
    stats: Stats,
    /// Last API requests, oldest first.
    recorded: Mutex<VecDeque<RecordedRequest>>,
    /// Pending faults.
    faults: Mutex<FaultQueue>,
    /// Mirror of `faults.pending()` so the hot path can skip the lock.
    faults_pending: AtomicU64,
    /// Current latency (CLI value until changed by a fault).
    latency_ms: AtomicU64,
    /// Source of response ids.
    next_id: AtomicU64,
}

impl MockState {
    /// Fresh state with the given latency.
    fn new(latency_ms: u64) -> Self {
        MockState {
            stats: Stats::default(),
            recorded: Mutex::new(VecDeque::with_capacity(RECORD_LIMIT)),
            faults: Mutex::new(FaultQueue::default()),
            faults_pending: AtomicU64::new(0),
            latency_ms: AtomicU64::new(latency_ms),
            next_id: AtomicU64::new(1),
        }
    }

    /// Remembers a request, dropping the oldest beyond [`RECORD_LIMIT`].
    fn record(&self, req: RecordedRequest) {
        let mut recorded = lock(&self.recorded);
        if recorded.len() >= RECORD_LIMIT {
            recorded.pop_front();
        }
        recorded.push_back(req);
    }

    /// Takes the fault for a request to `path`, if any.
    fn take_fault(&self, path: &str) -> Option<Fault> {
        if self.faults_pending.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut queue = lock(&self.faults);
        let fault = queue.take(path);
        self.faults_pending
            .store(queue.pending(), Ordering::Release);
        fault
    }

    /// Queues faults and/or changes the latency.
    fn add_faults(&self, latency_ms: Option<u64>, faults: Vec<QueuedFault>) {
        if let Some(ms) = latency_ms {
            self.latency_ms.store(ms, Ordering::Relaxed);
        }
        let mut queue = lock(&self.faults);
        for f in faults {
            queue.push(f);
        }
        self.faults_pending
            .store(queue.pending(), Ordering::Release);
    }

    /// `POST /_mock/reset`.
    fn reset(&self, latency_ms: u64) {
        self.stats.reset();
        lock(&self.recorded).clear();
        let mut queue = lock(&self.faults);
        queue.clear();
        self.faults_pending.store(0, Ordering::Release);
        self.latency_ms.store(latency_ms, Ordering::Relaxed);
    }
}

/// Locks a mutex, recovering from poisoning (the data stays usable for a mock).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------
// Fault parsing
// ---------------------------------------------------------------------------

/// Wire shape of one fault object.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultSpec {
    /// Status for status / raw error faults.
    status: Option<u16>,
    /// Number of requests affected (default 1).
    count: Option<u32>,
    /// Disconnect fault.
    disconnect_after_chunks: Option<u64>,
    /// Stall fault: token events before the pause.
    stall_after_chunks: Option<u64>,
    /// Stall fault: pause length.
    stall_ms: Option<u64>,
    /// Persistent latency change.
    latency_ms: Option<u64>,
    /// Raw error body.
    error_body: Option<String>,
    /// Its content type: `text/plain` (default), `application/json` or
    /// `text/event-stream` (hostile-provider tests answer 200 with these).
    content_type: Option<String>,
    /// Explicit `retry-after` seconds.
    retry_after: Option<u64>,
    /// Close without answering.
    drop_connection: Option<bool>,
    /// Restrict the fault to one path.
    path: Option<String>,
    /// Extra response headers on an otherwise normal answer.
    headers: Option<std::collections::BTreeMap<String, String>>,
    /// Report no usage.
    no_usage: Option<bool>,
    /// Echo the credential.
    echo_key: Option<bool>,
}

impl FaultSpec {
    /// Validates the spec and splits it into a latency change and a queued fault.
    fn into_parts(self) -> Result<(Option<u64>, Option<QueuedFault>), String> {
        let stall = self.stall_after_chunks.is_some() || self.stall_ms.is_some();
        let dropped = self.drop_connection == Some(true);
        let no_usage = self.no_usage == Some(true);
        let echo_key = self.echo_key == Some(true);
        let kinds = [
            no_usage,
            echo_key,
            self.headers.is_some(),
            self.error_body.is_some(),
            self.disconnect_after_chunks.is_some(),
            stall,
            dropped,
        ]
        .into_iter()
        .filter(|k| *k)
        .count();
        if kinds > 1 {
            return Err(
                "a fault may set only one of headers, error_body, disconnect_after_chunks, \
                 stall_after_chunks/stall_ms, drop_connection"
                    .to_owned(),
            );
        }
        if let Some(s) = self.status {
            if !(200..=599).contains(&s) {
                return Err(format!("status {s} is not between 200 and 599"));
            }
        }
        let takes_status = self.error_body.is_some() || kinds == 0;
        if self.status.is_some() && !takes_status {
            return Err("status only goes with error_body or alone".to_owned());
        }
        if self.content_type.is_some() && self.error_body.is_none() {
            return Err("content_type only goes with error_body".to_owned());
        }
        let fault = if let Some(body) = self.error_body {
            let content_type = match self.content_type.as_deref() {
                None | Some("text/plain") => "text/plain; charset=utf-8",
                Some("application/json") => "application/json",
                Some("text/event-stream") => "text/event-stream",
                Some(other) => {
                    return Err(format!(
                        "content_type must be text/plain, application/json or text/event-stream, not {other}"
                    ))
                }
            };
            Some(Fault::RawError {
                status: self.status.unwrap_or(500),
                body,
                content_type,
                retry_after: self.retry_after,
            })
        } else if let Some(k) = self.disconnect_after_chunks {
            Some(Fault::Disconnect { after_chunks: k })
        } else if stall {
            Some(Fault::Stall {
                after_chunks: self.stall_after_chunks.unwrap_or(0),
                stall_ms: self.stall_ms.unwrap_or(DEFAULT_STALL_MS),
            })
        } else if dropped {
            Some(Fault::DropConnection)
        } else if no_usage {
            Some(Fault::NoUsage)
        } else if echo_key {
            Some(Fault::EchoKey)
        } else if let Some(headers) = self.headers {
            Some(Fault::Headers(headers.into_iter().collect()))
        } else {
            self.status.map(|status| Fault::Status {
                status,
                retry_after: self.retry_after,
            })
        };
        if self.retry_after.is_some()
            && !matches!(fault, Some(Fault::Status { .. } | Fault::RawError { .. }))
        {
            return Err("retry_after only goes with status or error_body".to_owned());
        }
        let queued = match fault {
            Some(fault) => {
                let count = self.count.unwrap_or(1);
                if count == 0 {
                    return Err("count must be at least 1".to_owned());
                }
                Some(QueuedFault {
                    fault,
                    remaining: count,
                    path: self.path,
                })
            }
            None if self.latency_ms.is_none() => {
                return Err(
                    "empty fault: set status, error_body, disconnect_after_chunks, \
                     stall_after_chunks/stall_ms, drop_connection or latency_ms"
                        .to_owned(),
                )
            }
            None => None,
        };
        Ok((self.latency_ms, queued))
    }
}

/// Parses a `POST /_mock/faults` body: one fault object or an array of them.
fn parse_faults(body: &[u8]) -> Result<(Option<u64>, Vec<QueuedFault>), String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| format!("invalid JSON: {e}"))?;
    let specs = match value {
        Value::Array(items) => items,
        v @ Value::Object(_) => vec![v],
        _ => return Err("expected a fault object or an array of fault objects".to_owned()),
    };
    let mut latency = None;
    let mut faults = Vec::with_capacity(specs.len());
    for spec in specs {
        let spec: FaultSpec =
            serde_json::from_value(spec).map_err(|e| format!("invalid fault: {e}"))?;
        let (l, f) = spec.into_parts()?;
        latency = l.or(latency);
        faults.extend(f);
    }
    Ok((latency, faults))
}

// ---------------------------------------------------------------------------
// OpenAI request parsing (pure)
// ---------------------------------------------------------------------------

/// An OpenAI-shaped error response.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ApiError {
    /// HTTP status.
    status: u16,
    /// `error.message`.
    message: String,
    /// `error.type`.
    kind: &'static str,
    /// `error.code`.
    code: Option<&'static str>,
}

impl ApiError {
    /// 400 for a body that is not JSON, or JSON of the wrong shape.
    fn from_json(e: &serde_json::Error) -> Self {
        let code = match e.classify() {
            serde_json::error::Category::Data => "invalid_request",
            _ => "invalid_json",
        };
        ApiError {
            status: 400,
            message: format!("We could not parse the JSON body of your request: {e}"),
            kind: "invalid_request_error",
            code: Some(code),
        }
    }

    /// 400 for a request that parses but makes no sense.
    fn invalid(message: &str) -> Self {
        ApiError {
            status: 400,
            message: message.to_owned(),
            kind: "invalid_request_error",
            code: None,
        }
    }

    /// The error a status fault answers with.
    fn for_status(status: u16) -> Self {
        match status {
            429 => ApiError {
                status,
                message: "Rate limit reached for requests (runestone-mock fault)".to_owned(),
                kind: "rate_limit_error",
                code: Some("rate_limit_exceeded"),
            },
            500..=599 => ApiError {
                status,
                message: format!(
                    "The server had an error while processing your request (runestone-mock fault {status})"
                ),
                kind: "server_error",
                code: None,
            },
            _ => ApiError {
                status,
                message: format!("runestone-mock fault {status}"),
                kind: "invalid_request_error",
                code: None,
            },
        }
    }

    /// JSON body `{"error": {...}}`.
    fn body(&self) -> Vec<u8> {
        error_json(&self.message, self.kind, self.code)
    }
}

/// Serializes `{"error":{"message","type","param":null,"code"}}`.
fn error_json(message: &str, kind: &str, code: Option<&str>) -> Vec<u8> {
    /// `{"error": ...}` wrapper.
    #[derive(Serialize)]
    struct Envelope<'a> {
        error: Body<'a>,
    }
    /// OpenAI error object, fields in OpenAI's order.
    #[derive(Serialize)]
    struct Body<'a> {
        message: &'a str,
        #[serde(rename = "type")]
        kind: &'a str,
        param: Option<&'a str>,
        code: Option<&'a str>,
    }
    let v = Envelope {
        error: Body {
            message,
            kind,
            param: None,
            code,
        },
    };
    serde_json::to_vec(&v).unwrap_or_default()
}

/// Where a request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route<'a> {
    /// Chat completions, with the Azure deployment if any.
    Chat(Option<&'a str>),
    /// Legacy completions, with the Azure deployment if any.
    Completions(Option<&'a str>),
    /// Embeddings, with the Azure deployment if any.
    Embeddings(Option<&'a str>),
    /// `GET /v1/models`.
    Models,
    /// `GET /v1/models/{id}`.
    Model(&'a str),
    /// Anthropic `POST /v1/messages`.
    Messages,
    /// Anything else.
    NotFound,
}

/// Maps method and path to a [`Route`].
fn route<'a>(method: &Method, path: &'a str) -> Route<'a> {
    let post = method == Method::POST;
    let get = method == Method::GET;
    match path {
        "/v1/chat/completions" if post => return Route::Chat(None),
        "/v1/completions" if post => return Route::Completions(None),
        "/v1/embeddings" if post => return Route::Embeddings(None),
        "/v1/models" if get => return Route::Models,
        "/v1/messages" if post => return Route::Messages,
        _ => {}
    }
    if get {
        if let Some(id) = path.strip_prefix("/v1/models/") {
            if !id.is_empty() {
                return Route::Model(id);
            }
        }
    }
    if post {
        if let Some((dep, rest)) = path
            .strip_prefix("/openai/deployments/")
            .and_then(|r| r.split_once('/'))
        {
            if !dep.is_empty() {
                match rest {
                    "chat/completions" => return Route::Chat(Some(dep)),
                    "completions" => return Route::Completions(Some(dep)),
                    "embeddings" => return Route::Embeddings(Some(dep)),
                    _ => {}
                }
            }
        }
    }
    Route::NotFound
}

/// `stream_options` of a request.
#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    /// Send a final usage event.
    #[serde(default)]
    include_usage: Option<bool>,
}

/// One chat message (only the content matters).
#[derive(Debug, Deserialize)]
struct ChatMessage {
    /// String, array of parts, or null.
    #[serde(default)]
    content: Option<Value>,
}

/// Fields of `/v1/chat/completions` the mock reads.
#[derive(Debug, Deserialize)]
struct ChatBody {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    messages: Option<Vec<ChatMessage>>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    mock_tokens: Option<u64>,
}

/// Fields of `/v1/completions` the mock reads.
#[derive(Debug, Deserialize)]
struct CompletionBody {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    prompt: Option<Value>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    mock_tokens: Option<u64>,
}

/// Fields of `/v1/embeddings` the mock reads.
#[derive(Debug, Deserialize)]
struct EmbeddingsBody {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    input: Option<Value>,
    #[serde(default)]
    encoding_format: Option<String>,
}

/// How long a reply is and why it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Plan {
    /// Completion tokens to generate.
    tokens: u64,
    /// `"stop"` or `"length"`.
    finish_reason: &'static str,
}

/// Reply length: `min(mock_tokens or 16, cap)`, `"length"` when the cap cut it.
fn plan(mock_tokens: Option<u64>, caps: &[Option<u64>]) -> Plan {
    let natural = mock_tokens
        .unwrap_or(DEFAULT_COMPLETION_TOKENS)
        .min(MAX_MOCK_TOKENS);
    let cap = caps.iter().flatten().copied().min();
    match cap {
        Some(c) if c < natural => Plan {
            tokens: c,
            finish_reason: "length",
        },
        _ => Plan {
            tokens: natural,
            finish_reason: "stop",
        },
    }
}

/// `ceil(bytes / 4)`.
fn bytes_to_tokens(bytes: u64) -> u64 {
    bytes.div_ceil(4)
}

/// Bytes of the text in a message `content` (string or array of text parts).
fn content_bytes(content: &Value) -> u64 {
    match content {
        Value::String(s) => s.len() as u64,
        Value::Array(parts) => parts
            .iter()
            .map(|p| match p {
                Value::String(s) => s.len() as u64,
                Value::Object(o) => o
                    .get("text")
                    .and_then(Value::as_str)
                    .map_or(0, |s| s.len() as u64),
                _ => 0,
            })
            .sum(),
        _ => 0,
    }
}

/// Chat prompt tokens: `ceil(content bytes / 4) + 4 * messages`, at least 1.
fn chat_prompt_tokens(messages: &[ChatMessage]) -> u64 {
    let bytes: u64 = messages
        .iter()
        .filter_map(|m| m.content.as_ref())
        .map(content_bytes)
        .sum();
    (bytes_to_tokens(bytes) + 4 * messages.len() as u64).max(1)
}

/// Legacy prompt tokens: `ceil(string bytes / 4) + literal token ids`, at least 1.
fn completion_prompt_tokens(prompt: Option<&Value>) -> u64 {
    /// Accumulates string bytes and literal token ids.
    fn walk(v: &Value, bytes: &mut u64, ids: &mut u64) {
        match v {
            Value::String(s) => *bytes += s.len() as u64,
            Value::Number(_) => *ids += 1,
            Value::Array(items) => items.iter().for_each(|i| walk(i, bytes, ids)),
            _ => {}
        }
    }
    let (mut bytes, mut ids) = (0, 0);
    if let Some(p) = prompt {
        walk(p, &mut bytes, &mut ids);
    }
    (bytes_to_tokens(bytes) + ids).max(1)
}

/// A parsed generation request (chat or legacy completion).
#[derive(Debug, Clone, PartialEq, Eq)]
struct GenRequest {
    /// Model named by the request (or deployment).
    model: Option<String>,
    /// Prompt tokens reported in usage.
    prompt_tokens: u64,
    /// Reply length.
    plan: Plan,
    /// SSE response requested.
    stream: bool,
    /// Final usage event requested.
    include_usage: bool,
}

/// Parses a chat completion request.
fn parse_chat(body: &[u8], deployment: Option<&str>) -> Result<GenRequest, ApiError> {
    let b: ChatBody = serde_json::from_slice(body).map_err(|e| ApiError::from_json(&e))?;
    let messages = b.messages.unwrap_or_default();
    Ok(GenRequest {
        model: b.model.or_else(|| deployment.map(str::to_owned)),
        prompt_tokens: chat_prompt_tokens(&messages),
        plan: plan(b.mock_tokens, &[b.max_tokens, b.max_completion_tokens]),
        stream: b.stream.unwrap_or(false),
        include_usage: b
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
    })
}

/// Parses a legacy completion request.
fn parse_completion(body: &[u8], deployment: Option<&str>) -> Result<GenRequest, ApiError> {
    let b: CompletionBody = serde_json::from_slice(body).map_err(|e| ApiError::from_json(&e))?;
    Ok(GenRequest {
        model: b.model.or_else(|| deployment.map(str::to_owned)),
        prompt_tokens: completion_prompt_tokens(b.prompt.as_ref()),
        plan: plan(b.mock_tokens, &[b.max_tokens]),
        stream: b.stream.unwrap_or(false),
        include_usage: b
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
    })
}

/// A parsed embeddings request.
#[derive(Debug, Clone, PartialEq)]
struct EmbeddingsRequest {
    /// Model named by the request (or deployment).
    model: Option<String>,
    /// One vector per input.
    vectors: Vec<[f32; EMBEDDING_DIMS]>,
    /// Prompt tokens reported in usage.
    prompt_tokens: u64,
    /// Base64 encoding requested.
    base64: bool,
}

/// Deterministic unit vector derived from SHA-256 of `data`.
fn embed(data: &[u8]) -> [f32; EMBEDDING_DIMS] {
    let digest = Sha256::digest(data);
    let mut v = [0f64; EMBEDDING_DIMS];
    for (i, x) in v.iter_mut().enumerate() {
        let word = u32::from_le_bytes([
            digest[4 * i],
            digest[4 * i + 1],
            digest[4 * i + 2],
            digest[4 * i + 3],
        ]);
        *x = f64::from(word) / f64::from(u32::MAX) * 2.0 - 1.0;
    }
    let norm = v
        .iter()
        .map(|x| x * x)
        .sum::<f64>()
        .sqrt()
        .max(f64::MIN_POSITIVE);
    v.map(|x| (x / norm) as f32)
}

/// Parses an embeddings request.
fn parse_embeddings(body: &[u8], deployment: Option<&str>) -> Result<EmbeddingsRequest, ApiError> {
    let b: EmbeddingsBody = serde_json::from_slice(body).map_err(|e| ApiError::from_json(&e))?;
    let is_ids = |v: &Value| matches!(v, Value::Array(a) if a.iter().all(Value::is_number));
    let bad =
        || ApiError::invalid("'input' must be a string, an array of strings, or token arrays");
    let input = b
        .input
        .ok_or_else(|| ApiError::invalid("'input' is a required property"))?;
    let items: Vec<&Value> = match &input {
        Value::String(_) => vec![&input],
        Value::Array(a) if !a.is_empty() && a.iter().all(Value::is_number) => vec![&input],
        Value::Array(a) if !a.is_empty() => a.iter().collect(),
        _ => return Err(bad()),
    };
    let mut vectors = Vec::with_capacity(items.len());
    let mut tokens = 0;
    for item in items {
        match item {
            Value::String(s) => {
                tokens += bytes_to_tokens(s.len() as u64);
                vectors.push(embed(s.as_bytes()));
            }
            Value::Array(ids) if is_ids(item) => {
                tokens += ids.len() as u64;
                vectors.push(embed(item.to_string().as_bytes()));
            }
            _ => return Err(bad()),
        }
    }
    Ok(EmbeddingsRequest {
        model: b.model.or_else(|| deployment.map(str::to_owned)),
        vectors,
        prompt_tokens: tokens.max(1),
        base64: b.encoding_format.as_deref() == Some("base64"),
    })
}

/// Standard base64 (with padding).
fn base64_encode(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A request after routing and body parsing.
#[derive(Debug)]
enum ApiCall {
    /// Chat completion.
    Chat(GenRequest),
    /// Legacy completion.
    Completion(GenRequest),
    /// Embeddings.
    Embeddings(EmbeddingsRequest),
    /// Anthropic Messages, with the first tool's name when tools were sent.
    Messages(GenRequest, Option<String>),
    /// Model list.
    Models,
    /// One model.
    Model(String),
    /// Unknown URL.
    NotFound,
    /// Body could not be parsed.
    Invalid(ApiError, Option<String>),
}

impl ApiCall {
    /// Routes and parses a request.
    fn parse(method: &Method, path: &str, body: &[u8]) -> Self {
        match route(method, path) {
            Route::Chat(dep) => parse_chat(body, dep).map_or_else(
                |e| ApiCall::Invalid(e, dep.map(str::to_owned)),
                ApiCall::Chat,
            ),
            Route::Completions(dep) => parse_completion(body, dep).map_or_else(
                |e| ApiCall::Invalid(e, dep.map(str::to_owned)),
                ApiCall::Completion,
            ),
            Route::Embeddings(dep) => parse_embeddings(body, dep).map_or_else(
                |e| ApiCall::Invalid(e, dep.map(str::to_owned)),
                ApiCall::Embeddings,
            ),
            Route::Messages => parse_messages(body).map_or_else(
                |e| ApiCall::Invalid(e, None),
                |(g, tool)| ApiCall::Messages(g, tool),
            ),
            Route::Models => ApiCall::Models,
            Route::Model(id) => ApiCall::Model(id.to_owned()),
            Route::NotFound => ApiCall::NotFound,
        }
    }

    /// Model named by the request, if any.
    fn model(&self) -> Option<&str> {
        match self {
            ApiCall::Chat(g) | ApiCall::Completion(g) | ApiCall::Messages(g, _) => {
                g.model.as_deref()
            }
            ApiCall::Embeddings(e) => e.model.as_deref(),
            ApiCall::Invalid(_, dep) => dep.as_deref(),
            ApiCall::Models | ApiCall::Model(_) | ApiCall::NotFound => None,
        }
    }

    /// Whether the answer is an SSE stream.
    fn is_stream(&self) -> bool {
        matches!(self, ApiCall::Chat(g) | ApiCall::Completion(g) | ApiCall::Messages(g, _) if g.stream)
    }
}

// ---------------------------------------------------------------------------
// Response bodies (pure)
// ---------------------------------------------------------------------------

/// `usage` object.
#[derive(Debug, Serialize)]
struct Usage {
    prompt_tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    completion_tokens: Option<u64>,
    total_tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_tokens_details: Option<PromptTokensDetails>,
}

/// `usage.prompt_tokens_details`.
#[derive(Debug, Serialize)]
struct PromptTokensDetails {
    cached_tokens: u64,
}

impl Usage {
    /// Usage of a chat completion (with `prompt_tokens_details`).
    fn chat(prompt: u64, completion: u64) -> Self {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: Some(completion),
            total_tokens: prompt + completion,
            prompt_tokens_details: Some(PromptTokensDetails { cached_tokens: 0 }),
        }
    }

    /// Usage of a legacy completion or embeddings request.
    fn plain(prompt: u64, completion: u64) -> Self {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: Some(completion),
            total_tokens: prompt + completion,
            prompt_tokens_details: None,
        }
    }

    /// Usage of an embeddings request (no completion tokens).
    fn embeddings(prompt: u64) -> Self {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: None,
            total_tokens: prompt,
            prompt_tokens_details: None,
        }
    }
}

/// The reply text: `"tok0 tok1 ... tok{n-1}"`.
fn reply_text(n: u64) -> String {
    let mut s = String::with_capacity(n as usize * 7);
    for i in 0..n {
        if i > 0 {
            s.push(' ');
        }
        // writing to a String cannot fail
        let _ = write!(s, "tok{i}");
    }
    s
}

/// Top level of a non-streamed completion, fields in OpenAI's order.
#[derive(Debug, Serialize)]
struct CompletionObject<'a, C> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    system_fingerprint: Option<&'a str>,
    choices: [C; 1],
    usage: Usage,
}

/// `choices[0]` of a `chat.completion`.
#[derive(Debug, Serialize)]
struct ChatChoice {
    index: u32,
    message: ChatReply,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

/// `choices[0].message` of a `chat.completion`.
#[derive(Debug, Serialize)]
struct ChatReply {
    role: &'static str,
    content: String,
    refusal: Option<()>,
}

/// `choices[0]` of a `text_completion`.
#[derive(Debug, Serialize)]
struct TextChoice {
    text: String,
    index: u32,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

/// Non-streamed `chat.completion` body.
fn chat_completion_body(id: &str, created: u64, model: &str, g: &GenRequest) -> Vec<u8> {
    let v = CompletionObject {
        id,
        object: "chat.completion",
        created,
        model,
        system_fingerprint: None,
        choices: [ChatChoice {
            index: 0,
            message: ChatReply {
                role: "assistant",
                content: reply_text(g.plan.tokens),
                refusal: None,
            },
            logprobs: None,
            finish_reason: g.plan.finish_reason,
        }],
        usage: Usage::chat(g.prompt_tokens, g.plan.tokens),
    };
    serde_json::to_vec(&v).unwrap_or_default()
}

/// Fields of an Anthropic `/v1/messages` request the mock reads.
#[derive(Debug, Deserialize)]
struct MessagesBody {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    messages: Option<Vec<ChatMessage>>,
    #[serde(default)]
    system: Option<Value>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    tools: Option<Vec<Value>>,
    #[serde(default)]
    mock_tokens: Option<u64>,
}

/// Parses a Messages request; Anthropic requires `max_tokens`.
fn parse_messages(body: &[u8]) -> Result<(GenRequest, Option<String>), ApiError> {
    let b: MessagesBody = serde_json::from_slice(body).map_err(|e| ApiError::from_json(&e))?;
    let Some(max_tokens) = b.max_tokens else {
        return Err(ApiError {
            status: 400,
            message: "max_tokens: Field required".to_owned(),
            kind: "invalid_request_error",
            code: None,
        });
    };
    let messages = b.messages.unwrap_or_default();
    let system = b.system.as_ref().map_or(0, content_bytes);
    let tool = b
        .tools
        .as_ref()
        .and_then(|t| t.first())
        .and_then(|t| t["name"].as_str())
        .map(str::to_owned);
    Ok((
        GenRequest {
            model: b.model,
            prompt_tokens: chat_prompt_tokens(&messages) + bytes_to_tokens(system),
            plan: plan(b.mock_tokens, &[Some(max_tokens)]),
            stream: b.stream.unwrap_or(false),
            include_usage: false,
        },
        tool,
    ))
}

/// Non-streamed Anthropic message: the reply text, or a call of the first
/// tool when tools were sent.
fn messages_body(id: u64, model: &str, g: &GenRequest, tool: Option<&str>) -> Vec<u8> {
    let (content, stop) = match tool {
        Some(name) => (
            json!([{"type": "tool_use", "id": format!("toolu_mock_{id}"), "name": name, "input": {"mock": true}}]),
            "tool_use",
        ),
        None => (
            json!([{"type": "text", "text": reply_text(g.plan.tokens)}]),
            if g.plan.finish_reason == "length" {
                "max_tokens"
            } else {
                "end_turn"
            },
        ),
    };
    let v = json!({
        "id": format!("msg_mock_{id}"), "type": "message", "role": "assistant", "model": model,
        "content": content, "stop_reason": stop, "stop_sequence": null,
        "usage": {"input_tokens": g.prompt_tokens, "output_tokens": g.plan.tokens,
                  "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0},
    });
    serde_json::to_vec(&v).unwrap_or_default()
}

/// Non-streamed `text_completion` body.
fn text_completion_body(id: &str, created: u64, model: &str, g: &GenRequest) -> Vec<u8> {
    let v = CompletionObject {
        id,
        object: "text_completion",
        created,
        model,
        system_fingerprint: None,
        choices: [TextChoice {
            text: reply_text(g.plan.tokens),
            index: 0,
            logprobs: None,
            finish_reason: g.plan.finish_reason,
        }],
        usage: Usage::plain(g.prompt_tokens, g.plan.tokens),
    };
    serde_json::to_vec(&v).unwrap_or_default()
}

/// Embeddings response body.
fn embeddings_body(model: &str, e: &EmbeddingsRequest) -> Vec<u8> {
    /// One embedding vector, as floats or base64.
    #[derive(Serialize)]
    #[serde(untagged)]
    enum Vector<'a> {
        Floats(&'a [f32; EMBEDDING_DIMS]),
        Base64(String),
    }
    /// `data[i]`.
    #[derive(Serialize)]
    struct Item<'a> {
        object: &'static str,
        index: usize,
        embedding: Vector<'a>,
    }
    /// The response.
    #[derive(Serialize)]
    struct List<'a> {
        object: &'static str,
        data: Vec<Item<'a>>,
        model: &'a str,
        usage: Usage,
    }
    let data = e
        .vectors
        .iter()
        .enumerate()
        .map(|(index, v)| Item {
            object: "embedding",
            index,
            embedding: if e.base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                Vector::Base64(base64_encode(&bytes))
            } else {
                Vector::Floats(v)
            },
        })
        .collect();
    let v = List {
        object: "list",
        data,
        model,
        usage: Usage::embeddings(e.prompt_tokens),
    };
    serde_json::to_vec(&v).unwrap_or_default()
}

/// One model object.
fn model_json(id: &str) -> Value {
    json!({"id": id, "object": "model", "created": 0, "owned_by": "runestone-mock"})
}

/// CLOCK_MONOTONIC in microseconds: the clock a client on the same machine
/// reads with Python's `time.clock_gettime(time.CLOCK_MONOTONIC)`.
fn monotonic_us() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000)
        .unwrap_or(0)
}

/// Which streaming dialect to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamKind {
    /// `chat.completion.chunk` events.
    Chat,
    /// `text_completion` events.
    Completion,
    /// Anthropic Messages events.
    Anthropic,
}

/// Parts shared by every SSE event of one stream.
#[derive(Debug, Clone)]
struct ChunkMeta {
    /// Dialect.
    kind: StreamKind,
    /// `{"id":..,"object":..,"created":..,"model":..,` (JSON, unterminated).
    prefix: String,
    /// `,"usage":null` when `include_usage`, else empty.
    usage_null: &'static str,
    /// Prompt and completion tokens, for Anthropic's usage fields.
    counts: (u64, u64),
}

impl ChunkMeta {
    /// Builds the shared event prefix.
    fn new(kind: StreamKind, id: &str, created: u64, model: &str, include_usage: bool) -> Self {
        let object = match kind {
            StreamKind::Chat => "chat.completion.chunk",
            StreamKind::Completion | StreamKind::Anthropic => "text_completion",
        };
        let quote = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned());
        let mut prefix = format!(
            "{{\"id\":{},\"object\":\"{object}\",\"created\":{created},\"model\":{},",
            quote(id),
            quote(model)
        );
        if kind == StreamKind::Chat {
            prefix.push_str("\"system_fingerprint\":null,");
        }
        ChunkMeta {
            kind,
            prefix,
            usage_null: if include_usage { ",\"usage\":null" } else { "" },
            counts: (0, 0),
        }
    }

    /// One Anthropic SSE event.
    fn anthropic_event(kind: &str, data: &Value) -> String {
        format!("event: {kind}\ndata: {data}\n\n")
    }

    /// An event with one choice. `text` must be JSON-safe (no escaping done).
    fn choice_event(&self, text: Option<&str>, role: bool, finish_reason: Option<&str>) -> String {
        let finish = match finish_reason {
            Some(r) => format!("\"{r}\""),
            None => "null".to_owned(),
        };
        let choice = match self.kind {
            StreamKind::Chat => {
                let delta = match (role, text) {
                    (true, t) => format!(
                        "{{\"role\":\"assistant\",\"content\":\"{}\"}}",
                        t.unwrap_or("")
                    ),
                    (false, Some(t)) => format!("{{\"content\":\"{t}\"}}"),
                    (false, None) => "{}".to_owned(),
                };
                format!("{{\"index\":0,\"delta\":{delta},\"logprobs\":null,\"finish_reason\":{finish}}}")
            }
            StreamKind::Completion | StreamKind::Anthropic => format!(
                "{{\"text\":\"{}\",\"index\":0,\"logprobs\":null,\"finish_reason\":{finish}}}",
                text.unwrap_or("")
            ),
        };
        format!(
            "data: {}\"choices\":[{choice}]{}}}\n\n",
            self.prefix, self.usage_null
        )
    }

    /// First chat event: role and empty content (Anthropic: message_start
    /// and the text block's start).
    fn role_event(&self) -> String {
        if self.kind == StreamKind::Anthropic {
            let start = json!({"type": "message_start", "message": {
                "id": "msg_mock", "type": "message", "role": "assistant", "content": [],
                "model": "mock", "stop_reason": null,
                "usage": {"input_tokens": self.counts.0, "output_tokens": 1,
                          "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}}});
            let block = json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}});
            return Self::anthropic_event("message_start", &start)
                + &Self::anthropic_event("ping", &json!({"type": "ping"}))
                + &Self::anthropic_event("content_block_start", &block);
        }
        self.choice_event(Some(""), true, None)
    }

    /// The event carrying token `i` (`"tok{i} "`).
    fn token_event(&self, i: u64) -> String {
        if self.kind == StreamKind::Anthropic {
            let delta = json!({"type": "content_block_delta", "index": 0,
                               "delta": {"type": "text_delta", "text": format!("tok{i} ")}});
            return Self::anthropic_event("content_block_delta", &delta);
        }
        self.choice_event(Some(&format!("tok{i} ")), false, None)
    }

    /// The end of the stream (`[DONE]`, or Anthropic's message_stop).
    fn done_event(&self) -> String {
        if self.kind == StreamKind::Anthropic {
            return Self::anthropic_event("message_stop", &json!({"type": "message_stop"}));
        }
        DONE_EVENT.to_owned()
    }

    /// The event carrying `finish_reason` (empty delta / text).
    fn finish_event(&self, finish_reason: &str) -> String {
        match self.kind {
            StreamKind::Chat => self.choice_event(None, false, Some(finish_reason)),
            StreamKind::Completion => self.choice_event(Some(""), false, Some(finish_reason)),
            StreamKind::Anthropic => {
                let stop = if finish_reason == "length" {
                    "max_tokens"
                } else {
                    "end_turn"
                };
                Self::anthropic_event(
                    "content_block_stop",
                    &json!({"type": "content_block_stop", "index": 0}),
                ) + &Self::anthropic_event(
                    "message_delta",
                    &json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null},
                                "usage": {"output_tokens": self.counts.1}}),
                )
            }
        }
    }

    /// The final `"choices": []` event with usage.
    fn usage_event(&self, prompt: u64, completion: u64) -> String {
        let usage = match self.kind {
            StreamKind::Chat => Usage::chat(prompt, completion),
            StreamKind::Completion | StreamKind::Anthropic => Usage::plain(prompt, completion),
        };
        format!(
            "data: {}\"choices\":[],\"usage\":{}}}\n\n",
            self.prefix,
            serde_json::to_string(&usage).unwrap_or_default()
        )
    }
}

/// The stream terminator.
const DONE_EVENT: &str = "data: [DONE]\n\n";

// ---------------------------------------------------------------------------
// HTTP plumbing
// ---------------------------------------------------------------------------

/// What to do with the connection after a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Response complete: offer the connection for keep-alive.
    Reuse,
    /// Close the connection.
    Close,
}

/// Per-request facts echoed in API response headers.
#[derive(Debug)]
struct ApiMeta {
    /// Request number (ids and `x-request-id`).
    id: u64,
    /// Request body length.
    body_len: usize,
    /// Hex SHA-256 of the request body.
    body_sha256: String,
    /// Model named by the request.
    model: Option<String>,
    /// Extra response headers from a `headers` fault.
    extra_headers: Vec<(String, String)>,
    /// The credential to echo (an `echo_key` fault).
    echo_key: Option<String>,
}

impl ApiMeta {
    /// Response header with the `x-mock-*` headers.
    fn header(&self, status: u16, content_type: &str) -> Box<ResponseHeader> {
        let mut h = response_header(status, content_type);
        let _ = h.insert_header("x-mock-request-bytes", self.body_len.to_string());
        let _ = h.insert_header("x-mock-body-sha256", self.body_sha256.as_str());
        if let Some(m) = &self.model {
            // a model name that is not a valid header value is simply not echoed
            let _ = h.insert_header("x-mock-model", m.as_str());
        }
        let _ = h.insert_header("x-request-id", format!("req_mock_{}", self.id));
        if let Some(key) = &self.echo_key {
            for name in [
                "x-request-id",
                "openai-version",
                "openai-processing-ms",
                "cache-control",
            ] {
                let _ = h.insert_header(name, key.as_str());
            }
        }
        for (name, value) in &self.extra_headers {
            let _ = h.append_header(name.clone(), value.as_str());
        }
        h
    }

    /// The model to put in response bodies.
    fn response_model(&self) -> &str {
        self.model.as_deref().unwrap_or(DEFAULT_MODEL)
    }
}

/// The credential a request carried: the bearer key, `x-api-key` or `api-key`.
fn credential(headers: &HeaderMap) -> String {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    header("authorization")
        .map(|v| v.strip_prefix("Bearer ").unwrap_or(v))
        .or_else(|| header("x-api-key"))
        .or_else(|| header("api-key"))
        .unwrap_or_default()
        .to_owned()
}

/// Every character of `text` as a JSON `\uXXXX` escape.
fn escape_every_char(text: &str) -> String {
    text.chars()
        .map(|c| format!("\\u{:04x}", c as u32))
        .collect()
}

/// A bare response header with a content type.
fn response_header(status: u16, content_type: &str) -> Box<ResponseHeader> {
    let mut h = ResponseHeader::build(status, Some(8))
        .unwrap_or_else(|_| ResponseHeader::build(500, Some(8)).expect("500 is a valid status"));
    let _ = h.insert_header(http::header::CONTENT_TYPE, content_type);
    Box::new(h)
}

/// A complete (non-streamed) response.
#[derive(Debug)]
struct Reply {
    /// Status.
    status: u16,
    /// `content-type`.
    content_type: &'static str,
    /// Body.
    body: Bytes,
    /// `retry-after` seconds.
    retry_after: Option<u64>,
    /// (prompt, completion) tokens to account when the response is delivered.
    tokens: Option<(u64, u64)>,
}

impl Reply {
    /// The same reply without its `usage` member.
    fn without_usage(mut self) -> Self {
        if let Ok(Value::Object(mut body)) = serde_json::from_slice::<Value>(&self.body) {
            body.remove("usage");
            self.body = serde_json::to_vec(&body).unwrap_or_default().into();
        }
        self
    }

    /// The same reply echoing `key`: as `system_fingerprint` and, escaped
    /// character by character, as `echo_escaped` (JSON objects only).
    fn with_echo(mut self, key: &str) -> Self {
        if let Ok(Value::Object(mut body)) = serde_json::from_slice::<Value>(&self.body) {
            body.insert("system_fingerprint".into(), json!(key));
            body.insert("echo_escaped".into(), json!("@ECHO@"));
            let text = serde_json::to_string(&body)
                .unwrap_or_default()
                .replace("@ECHO@", &escape_every_char(key));
            self.body = text.into_bytes().into();
        }
        self
    }

    /// A JSON reply.
    fn json(status: u16, body: Vec<u8>) -> Self {
        Reply {
            status,
            content_type: "application/json",
            body: body.into(),
            retry_after: None,
            tokens: None,
        }
    }

    /// An OpenAI-shaped error reply.
    fn error(e: &ApiError) -> Self {
        Reply::json(e.status, e.body())
    }
}

/// Why reading the request body stopped.
#[derive(Debug)]
enum BodyError {
    /// Larger than [`MAX_BODY_BYTES`].
    TooLarge,
    /// The client went away or sent garbage.
    Io,
}

/// Reads the whole request body without copying in the common single-chunk case.
async fn read_body(session: &mut ServerSession) -> Result<Bytes, BodyError> {
    let hint = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if hint.is_some_and(|n| n > MAX_BODY_BYTES) {
        return Err(BodyError::TooLarge);
    }
    let mut first: Option<Bytes> = None;
    let mut rest: Option<BytesMut> = None;
    let mut total = 0usize;
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                total += chunk.len();
                if total > MAX_BODY_BYTES {
                    return Err(BodyError::TooLarge);
                }
                if let Some(buf) = rest.as_mut() {
                    buf.extend_from_slice(&chunk);
                } else if let Some(f) = first.take() {
                    let mut buf = BytesMut::with_capacity(hint.unwrap_or(0).max(total));
                    buf.extend_from_slice(&f);
                    buf.extend_from_slice(&chunk);
                    rest = Some(buf);
                } else {
                    first = Some(chunk);
                }
            }
            Ok(None) => break,
            Err(_) => return Err(BodyError::Io),
        }
    }
    Ok(match (rest, first) {
        (Some(buf), _) => buf.freeze(),
        (None, Some(f)) => f,
        (None, None) => Bytes::new(),
    })
}

/// Sleeps `dur`, watching for the client to go away meanwhile.
///
/// Returns `false` when the client closed or reset the connection. If the
/// client sent more data instead (pipelining), watching stops for the rest of
/// this request and the connection will not be reused.
async fn pause(session: &mut ServerSession, watch: &mut bool, dur: Duration) -> bool {
    if dur.is_zero() {
        return true;
    }
    let sleep = tokio::time::sleep(dur);
    tokio::pin!(sleep);
    if *watch {
        tokio::select! {
            _ = &mut sleep => return true,
            res = session.read_body_or_idle(true) => match res {
                Err(e) if matches!(e.etype(), ErrorType::ConnectionClosed | ErrorType::ReadError) => {
                    return false;
                }
                _ => {
                    *watch = false;
                    session.set_keepalive(None);
                }
            },
        }
    }
    sleep.await;
    true
}

/// Current Unix time in seconds.
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

// ---------------------------------------------------------------------------
// The application
// ---------------------------------------------------------------------------

/// The pingora HTTP application.
#[derive(Debug)]
struct MockApp {
    /// Command line settings.
    cfg: MockConfig,
    /// Mutable state.
    state: MockState,
}

#[async_trait]
impl HttpServerApp for MockApp {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        match session.read_request().await {
            Ok(true) => {}
            // client closed an idle keep-alive connection, or sent garbage
            Ok(false) | Err(_) => return None,
        }
        let keepalive = if *shutdown.borrow() { None } else { Some(60) };
        session.set_keepalive(keepalive);

        match self.handle(&mut session).await {
            Outcome::Reuse => {
                let settings = HttpPersistentSettings::for_session(&session);
                match session.finish().await {
                    Ok(Some(stream)) => {
                        Some(ReusedHttpStream::from_reusable_stream(stream, settings))
                    }
                    Ok(None) | Err(_) => None,
                }
            }
            Outcome::Close => {
                session.shutdown().await;
                None
            }
        }
    }
}

impl MockApp {
    /// Handles one request.
    async fn handle(&self, session: &mut ServerSession) -> Outcome {
        let expects_continue = session
            .req_header()
            .headers
            .get(http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if expects_continue && session.write_continue_response().await.is_err() {
            return Outcome::Close;
        }
        let body = match read_body(session).await {
            Ok(b) => b,
            Err(BodyError::Io) => return Outcome::Close,
            Err(BodyError::TooLarge) => {
                session.set_keepalive(None);
                let e = ApiError {
                    status: 413,
                    message: format!("Request body larger than {MAX_BODY_BYTES} bytes"),
                    kind: "invalid_request_error",
                    code: Some("request_too_large"),
                };
                let _ = send(
                    session,
                    response_header(413, "application/json"),
                    &Reply::error(&e),
                )
                .await;
                return Outcome::Close;
            }
        };
        let path = session.req_header().uri.path();
        if path == "/health" || path == "/_mock" || path.starts_with("/_mock/") {
            let reply = self.control(session.req_header().method.clone(), path, &body);
            return send(
                session,
                response_header(reply.status, reply.content_type),
                &reply,
            )
            .await;
        }
        self.api(session, body).await
    }

    /// Serves a control endpoint.
    fn control(&self, method: Method, path: &str, body: &[u8]) -> Reply {
        let st = &self.state;
        match (method, path) {
            (_, "/health") => Reply {
                status: 200,
                content_type: "text/plain",
                body: Bytes::from_static(b"ok"),
                retry_after: None,
                tokens: None,
            },
            (Method::GET, "/_mock/stats") => {
                let v = json!({
                    "requests": st.stats.requests.load(Ordering::Relaxed),
                    "by_path": st.stats.by_path(),
                    "prompt_tokens": st.stats.prompt_tokens.load(Ordering::Relaxed),
                    "completion_tokens": st.stats.completion_tokens.load(Ordering::Relaxed),
                    "disconnects": st.stats.disconnects.load(Ordering::Relaxed),
                    "faults_pending": st.faults_pending.load(Ordering::Acquire),
                    "latency_ms": st.latency_ms.load(Ordering::Relaxed),
                });
                Reply::json(200, serde_json::to_vec(&v).unwrap_or_default())
            }
            (Method::GET, "/_mock/requests") => {
                let items: Vec<Value> = lock(&st.recorded).iter().map(|r| r.to_json()).collect();
                Reply::json(200, serde_json::to_vec(&items).unwrap_or_default())
            }
            (Method::POST, "/_mock/reset") => {
                st.reset(self.cfg.latency_ms);
                Reply::json(200, b"{\"ok\":true}".to_vec())
            }
            (Method::GET, "/_mock/faults") => {
                let pending: Vec<Value> = lock(&st.faults)
                    .entries
                    .iter()
                    .map(|f| f.to_json())
                    .collect();
                let v = json!({
                    "faults": pending,
                    "latency_ms": st.latency_ms.load(Ordering::Relaxed),
                });
                Reply::json(200, serde_json::to_vec(&v).unwrap_or_default())
            }
            (Method::POST, "/_mock/faults") => match parse_faults(body) {
                Ok((latency, faults)) => {
                    st.add_faults(latency, faults);
                    Reply::json(200, b"{\"ok\":true}".to_vec())
                }
                Err(msg) => Reply::json(
                    400,
                    error_json(&msg, "invalid_request_error", Some("invalid_fault")),
                ),
            },
            (method, path) => Reply::json(
                404,
                error_json(
                    &format!("Unknown control endpoint: {method} {path}"),
                    "invalid_request_error",
                    Some("unknown_url"),
                ),
            ),
        }
    }

    /// Whether the request carries the configured API key (always true without one).
    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(key) = self.cfg.api_key.as_deref() else {
            return true;
        };
        let bearer = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .is_some_and(|v| v.trim() == key);
        bearer
            || ["api-key", "x-api-key"].iter().any(|h| {
                headers
                    .get(*h)
                    .is_some_and(|v| v.as_bytes() == key.as_bytes())
            })
    }

    /// Serves an API request.
    async fn api(&self, session: &mut ServerSession, body: Bytes) -> Outcome {
        let st = &self.state;
        let req = session.req_header();
        let path = req.uri.path();
        st.stats.count_request(path);
        let id = st.next_id.fetch_add(1, Ordering::Relaxed);
        let mut call = ApiCall::parse(&req.method, path, &body);
        let sha: [u8; 32] = Sha256::digest(&body).into();
        let model = call.model().map(str::to_owned);
        st.record(RecordedRequest {
            method: req.method.clone(),
            path: path.to_owned(),
            query: req.uri.query().map(str::to_owned),
            headers: req.headers.clone(),
            body_bytes: body.len(),
            body_sha256: sha,
            model: model.clone(),
        });
        let fault = st.take_fault(path);
        let authorized = self.authorized(&req.headers);
        let req_headers = req.headers.clone();
        let mut meta = ApiMeta {
            id,
            body_len: body.len(),
            body_sha256: hex::encode(sha),
            model,
            extra_headers: Vec::new(),
            echo_key: None,
        };
        drop(body);

        let mut watch = true;
        let latency = st.latency_ms.load(Ordering::Relaxed);
        if latency > 0 && !pause(session, &mut watch, Duration::from_millis(latency)).await {
            st.stats.disconnect();
            return Outcome::Close;
        }

        let mut disconnect_after = None;
        let mut stall_in_stream = None;
        let mut no_usage = false;
        match fault {
            None => {}
            Some(Fault::Headers(headers)) => meta.extra_headers = headers,
            Some(Fault::EchoKey) => meta.echo_key = Some(credential(&req_headers)),
            Some(Fault::NoUsage) => {
                no_usage = true;
                if let ApiCall::Chat(g) | ApiCall::Completion(g) = &mut call {
                    g.include_usage = false;
                }
            }
            Some(Fault::DropConnection) => return Outcome::Close,
            Some(Fault::Status {
                status,
                retry_after,
            }) => {
                let mut reply = Reply::error(&ApiError::for_status(status));
                reply.retry_after = retry_after.or((status == 429).then_some(1));
                return self.reply(session, &meta, &reply, None).await;
            }
            Some(Fault::RawError {
                status,
                body,
                content_type,
                retry_after,
            }) => {
                let reply = Reply {
                    status,
                    content_type,
                    body: body.into(),
                    retry_after,
                    tokens: None,
                };
                return self.reply(session, &meta, &reply, None).await;
            }
            Some(Fault::Disconnect { after_chunks }) => disconnect_after = Some(after_chunks),
            Some(Fault::Stall {
                after_chunks,
                stall_ms,
            }) => {
                if after_chunks == 0 || !call.is_stream() {
                    if !pause(session, &mut watch, Duration::from_millis(stall_ms)).await {
                        st.stats.disconnect();
                        return Outcome::Close;
                    }
                } else {
                    stall_in_stream = Some((after_chunks, stall_ms));
                }
            }
        }

        if !authorized {
            let e = ApiError {
                status: 401,
                message: match &meta.echo_key {
                    Some(key) => format!("Incorrect API key provided: {key}"),
                    None => "Incorrect API key provided".to_owned(),
                },
                kind: "invalid_request_error",
                code: Some("invalid_api_key"),
            };
            return self
                .reply(session, &meta, &Reply::error(&e), disconnect_after)
                .await;
        }

        let created = unix_now();
        let reply = match &call {
            ApiCall::Chat(g) | ApiCall::Completion(g) | ApiCall::Messages(g, _) if g.stream => {
                let kind = match call {
                    ApiCall::Chat(_) => StreamKind::Chat,
                    ApiCall::Messages(..) => StreamKind::Anthropic,
                    _ => StreamKind::Completion,
                };
                let plan = StreamPlan {
                    kind,
                    gen: g,
                    created,
                    disconnect_after,
                    stall: stall_in_stream,
                };
                return self.stream(session, &meta, &plan, &mut watch).await;
            }
            ApiCall::Messages(g, tool) => {
                let mut r = Reply::json(
                    200,
                    messages_body(meta.id, meta.response_model(), g, tool.as_deref()),
                );
                r.tokens = Some((g.prompt_tokens, g.plan.tokens));
                r
            }
            ApiCall::Chat(g) => {
                let id = format!("chatcmpl-mock-{}", meta.id);
                let mut r = Reply::json(
                    200,
                    chat_completion_body(&id, created, meta.response_model(), g),
                );
                r.tokens = Some((g.prompt_tokens, g.plan.tokens));
                r
            }
            ApiCall::Completion(g) => {
                let id = format!("cmpl-mock-{}", meta.id);
                let mut r = Reply::json(
                    200,
                    text_completion_body(&id, created, meta.response_model(), g),
                );
                r.tokens = Some((g.prompt_tokens, g.plan.tokens));
                r
            }
            ApiCall::Embeddings(e) => {
                let mut r = Reply::json(200, embeddings_body(meta.response_model(), e));
                r.tokens = Some((e.prompt_tokens, 0));
                r
            }
            ApiCall::Models => {
                let v = json!({"object": "list", "data": [model_json(DEFAULT_MODEL)]});
                Reply::json(200, serde_json::to_vec(&v).unwrap_or_default())
            }
            ApiCall::Model(id) => {
                Reply::json(200, serde_json::to_vec(&model_json(id)).unwrap_or_default())
            }
            ApiCall::Invalid(e, _) => Reply::error(e),
            ApiCall::NotFound => {
                let req = session.req_header();
                Reply::error(&ApiError {
                    status: 404,
                    message: format!(
                        "Unknown request URL: {} {}. Please check the URL for typos.",
                        req.method,
                        req.uri.path()
                    ),
                    kind: "invalid_request_error",
                    code: Some("unknown_url"),
                })
            }
        };
        let reply = if no_usage {
            reply.without_usage()
        } else {
            reply
        };
        let reply = match &meta.echo_key {
            Some(key) => reply.with_echo(key),
            None => reply,
        };
        self.reply(session, &meta, &reply, disconnect_after).await
    }

    /// Writes a complete API response, honouring a disconnect fault and accounting tokens.
    async fn reply(
        &self,
        session: &mut ServerSession,
        meta: &ApiMeta,
        reply: &Reply,
        disconnect_after: Option<u64>,
    ) -> Outcome {
        let stats = &self.state.stats;
        let header = meta.header(reply.status, reply.content_type);
        if disconnect_after.is_some() {
            let mut header = header;
            let _ = header.insert_header(http::header::CONTENT_LENGTH, reply.body.len());
            if let Some(s) = reply.retry_after {
                let _ = header.insert_header(http::header::RETRY_AFTER, s);
            }
            if session.write_response_header(header).await.is_ok() {
                if let Some((prompt, _)) = reply.tokens {
                    stats.prompt_tokens.fetch_add(prompt, Ordering::Relaxed);
                }
                let half = reply.body.slice(..reply.body.len() / 2);
                let _ = session.write_response_body(half, false).await;
            }
            return Outcome::Close;
        }
        let outcome = send(session, header, reply).await;
        if outcome == Outcome::Reuse {
            if let Some((prompt, completion)) = reply.tokens {
                stats.prompt_tokens.fetch_add(prompt, Ordering::Relaxed);
                stats
                    .completion_tokens
                    .fetch_add(completion, Ordering::Relaxed);
            }
        } else if reply.status == 200 {
            stats.disconnect();
        }
        outcome
    }

    /// Streams a generation as SSE.
    async fn stream(
        &self,
        session: &mut ServerSession,
        meta: &ApiMeta,
        plan: &StreamPlan<'_>,
        watch: &mut bool,
    ) -> Outcome {
        let stats = &self.state.stats;
        let g = plan.gen;
        let id = match plan.kind {
            StreamKind::Chat => format!("chatcmpl-mock-{}", meta.id),
            StreamKind::Completion => format!("cmpl-mock-{}", meta.id),
            StreamKind::Anthropic => format!("msg_mock_{}", meta.id),
        };
        let chunks = ChunkMeta::new(
            plan.kind,
            &id,
            plan.created,
            meta.response_model(),
            g.include_usage,
        );

        let mut header = meta.header(200, "text/event-stream");
        let _ = header.insert_header(http::header::CACHE_CONTROL, "no-cache");
        if session.req_header().version != http::Version::HTTP_10 {
            let _ = header.insert_header(http::header::TRANSFER_ENCODING, "chunked");
        }
        if session.write_response_header(header).await.is_err() {
            stats.disconnect();
            return Outcome::Close;
        }
        stats
            .prompt_tokens
            .fetch_add(g.prompt_tokens, Ordering::Relaxed);

        let mut chunks = chunks;
        chunks.counts = (g.prompt_tokens, g.plan.tokens);
        if matches!(plan.kind, StreamKind::Chat | StreamKind::Anthropic)
            && session
                .write_response_body(chunks.role_event().into(), false)
                .await
                .is_err()
        {
            stats.disconnect();
            return Outcome::Close;
        }

        if let Some(key) = meta.echo_key.as_deref().filter(|k| !k.is_empty()) {
            // The raw key in two writes split mid-key, then the escaped key.
            let raw = chunks.choice_event(Some(&format!("key {key} ")), false, None);
            let split = raw.find(key).map_or(0, |at| at + key.len() / 2);
            let escaped = raw.replace(key, &escape_every_char(key));
            for (part, pause_after) in [
                (&raw[..split], true),
                (&raw[split..], false),
                (&escaped[..], false),
            ] {
                if session
                    .write_response_body(Bytes::copy_from_slice(part.as_bytes()), false)
                    .await
                    .is_err()
                {
                    stats.disconnect();
                    return Outcome::Close;
                }
                if pause_after && !pause(session, watch, Duration::from_millis(30)).await {
                    stats.disconnect();
                    return Outcome::Close;
                }
            }
        }

        let interval = (self.cfg.tokens_per_second > 0)
            .then(|| Duration::from_secs_f64(1.0 / self.cfg.tokens_per_second as f64));
        let mut next = Instant::now();
        for i in 0..g.plan.tokens {
            if plan.disconnect_after == Some(i) {
                return Outcome::Close;
            }
            if let Some((k, ms)) = plan.stall {
                if k == i {
                    if !pause(session, watch, Duration::from_millis(ms)).await {
                        stats.disconnect();
                        return Outcome::Close;
                    }
                    next = Instant::now();
                }
            }
            if let Some(iv) = interval {
                let now = Instant::now();
                if next > now && !pause(session, watch, next - now).await {
                    stats.disconnect();
                    return Outcome::Close;
                }
                next += iv;
            }
            let event = if self.cfg.stamp_chunks {
                chunks.choice_event(Some(&monotonic_us().to_string()), false, None)
            } else {
                chunks.token_event(i)
            };
            if session
                .write_response_body(event.into(), false)
                .await
                .is_err()
            {
                stats.disconnect();
                return Outcome::Close;
            }
            stats.completion_tokens.fetch_add(1, Ordering::Relaxed);
        }
        if plan.disconnect_after.is_some() {
            // asked to cut after at least as many tokens as the reply has
            return Outcome::Close;
        }
        if let Some((k, ms)) = plan.stall {
            // asked to stall after at least as many tokens as the reply has
            if k >= g.plan.tokens && !pause(session, watch, Duration::from_millis(ms)).await {
                stats.disconnect();
                return Outcome::Close;
            }
        }

        let mut tail = chunks.finish_event(g.plan.finish_reason);
        if g.include_usage {
            tail.push_str(&chunks.usage_event(g.prompt_tokens, g.plan.tokens));
        }
        tail.push_str(&chunks.done_event());
        // the tail goes out as one chunk per event so clients see normal SSE framing
        for event in tail.split_inclusive("\n\n") {
            if session
                .write_response_body(Bytes::copy_from_slice(event.as_bytes()), false)
                .await
                .is_err()
            {
                stats.disconnect();
                return Outcome::Close;
            }
        }
        if session
            .write_response_body(Bytes::new(), true)
            .await
            .is_err()
        {
            stats.disconnect();
            return Outcome::Close;
        }
        Outcome::Reuse
    }
}

/// Parameters of one SSE stream.
#[derive(Debug)]
struct StreamPlan<'a> {
    /// Dialect.
    kind: StreamKind,
    /// The parsed request.
    gen: &'a GenRequest,
    /// `created` timestamp.
    created: u64,
    /// Close after this many token events.
    disconnect_after: Option<u64>,
    /// Pause (after token events, ms).
    stall: Option<(u64, u64)>,
}

/// Writes a complete response with a content length.
async fn send(
    session: &mut ServerSession,
    mut header: Box<ResponseHeader>,
    reply: &Reply,
) -> Outcome {
    let _ = header.insert_header(http::header::CONTENT_LENGTH, reply.body.len());
    if let Some(s) = reply.retry_after {
        let _ = header.insert_header(http::header::RETRY_AFTER, s);
    }
    if session.write_response_header(header).await.is_err() {
        return Outcome::Close;
    }
    match session.write_response_body(reply.body.clone(), true).await {
        Ok(()) => Outcome::Reuse,
        Err(_) => Outcome::Close,
    }
}

// ---------------------------------------------------------------------------
// Startup
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_event(event: &str) -> Value {
        let json = event
            .strip_prefix("data: ")
            .and_then(|e| e.strip_suffix("\n\n"))
            .expect("SSE framing");
        serde_json::from_str(json).expect("valid JSON event")
    }

    #[test]
    fn chat_prompt_tokens_count_bytes_and_messages() {
        let g = parse_chat(
            br#"{"model":"m","messages":[{"role":"user","content":"hello"}]}"#,
            None,
        )
        .unwrap();
        // ceil(5/4) = 2, + 4 for the message
        assert_eq!(g.prompt_tokens, 6);
        let g = parse_chat(
            br#"{"model":"m","messages":[
                {"role":"system","content":"abcd"},
                {"role":"user","content":[{"type":"text","text":"abcd"},{"type":"image_url","image_url":{"url":"x"}}]},
                {"role":"assistant","content":null}]}"#,
            None,
        )
        .unwrap();
        assert_eq!(g.prompt_tokens, 2 + 12);
        assert_eq!(parse_chat(b"{}", None).unwrap().prompt_tokens, 1);
    }

    #[test]
    fn completion_and_embedding_prompt_tokens() {
        assert_eq!(completion_prompt_tokens(Some(&json!("abcde"))), 2);
        assert_eq!(completion_prompt_tokens(Some(&json!(["ab", "cd", "e"]))), 2);
        assert_eq!(completion_prompt_tokens(Some(&json!([1, 2, 3]))), 3);
        assert_eq!(completion_prompt_tokens(None), 1);
        let e = parse_embeddings(br#"{"model":"e","input":["abcd","abcde"]}"#, None).unwrap();
        assert_eq!(e.prompt_tokens, 3);
        assert_eq!(e.vectors.len(), 2);
        let e = parse_embeddings(br#"{"input":[1,2,3]}"#, Some("dep")).unwrap();
        assert_eq!((e.vectors.len(), e.prompt_tokens), (1, 3));
        assert_eq!(e.model.as_deref(), Some("dep"));
        assert!(parse_embeddings(br#"{"input":{}}"#, None).is_err());
        assert!(parse_embeddings(br#"{"model":"x"}"#, None).is_err());
    }

    #[test]
    fn reply_length_and_finish_reason() {
        assert_eq!(
            plan(None, &[None, None]),
            Plan {
                tokens: 16,
                finish_reason: "stop"
            }
        );
        assert_eq!(plan(None, &[Some(5), None]).finish_reason, "length");
        assert_eq!(plan(None, &[Some(50), Some(3)]).tokens, 3);
        assert_eq!(plan(Some(1000), &[None]).tokens, 1000);
        assert_eq!(plan(Some(1000), &[Some(1000)]).finish_reason, "stop");
        assert_eq!(plan(Some(u64::MAX), &[None]).tokens, MAX_MOCK_TOKENS);
        assert_eq!(reply_text(3), "tok0 tok1 tok2");
        assert_eq!(reply_text(0), "");
    }

    #[test]
    fn json_errors_are_classified() {
        let e = parse_chat(b"{not json", None).unwrap_err();
        assert_eq!((e.status, e.code), (400, Some("invalid_json")));
        let e = parse_chat(br#"{"messages": 3}"#, None).unwrap_err();
        assert_eq!(e.code, Some("invalid_request"));
        let body: Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert!(body["error"]["param"].is_null());
        assert_eq!(
            String::from_utf8(error_json(
                "Incorrect API key provided",
                "invalid_request_error",
                Some("invalid_api_key")
            ))
            .unwrap(),
            r#"{"error":{"message":"Incorrect API key provided","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#
        );
    }

    #[test]
    fn chat_stream_events_are_valid_json() {
        let m = ChunkMeta::new(StreamKind::Chat, "chatcmpl-mock-7", 42, "we\"ird", true);
        let role = parse_event(&m.role_event());
        assert_eq!(role["object"], "chat.completion.chunk");
        assert_eq!(role["model"], "we\"ird");
        assert_eq!(role["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(role["choices"][0]["delta"]["content"], "");
        assert!(role["usage"].is_null() && role.get("usage").is_some());
        let tok = parse_event(&m.token_event(3));
        assert_eq!(tok["choices"][0]["delta"]["content"], "tok3 ");
        assert!(tok["choices"][0]["finish_reason"].is_null());
        let fin = parse_event(&m.finish_event("length"));
        assert_eq!(fin["choices"][0]["finish_reason"], "length");
        assert_eq!(fin["choices"][0]["delta"], json!({}));
        let usage = parse_event(&m.usage_event(10, 4));
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"]["total_tokens"], 14);
        assert_eq!(usage["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
        assert_eq!(usage["id"], "chatcmpl-mock-7");
        assert_eq!(usage["created"], 42);

        let plain = ChunkMeta::new(StreamKind::Chat, "c", 1, "m", false);
        assert!(parse_event(&plain.token_event(0)).get("usage").is_none());
    }

    #[test]
    fn completion_stream_events_are_valid_json() {
        let m = ChunkMeta::new(StreamKind::Completion, "cmpl-mock-1", 1, "m", true);
        let tok = parse_event(&m.token_event(0));
        assert_eq!(tok["object"], "text_completion");
        assert_eq!(tok["choices"][0]["text"], "tok0 ");
        let fin = parse_event(&m.finish_event("stop"));
        assert_eq!(fin["choices"][0]["text"], "");
        assert_eq!(fin["choices"][0]["finish_reason"], "stop");
        let usage = parse_event(&m.usage_event(3, 2));
        assert!(usage["usage"].get("prompt_tokens_details").is_none());
    }

    #[test]
    fn non_stream_bodies_have_openai_shape() {
        let g = parse_chat(br#"{"model":"gpt-x","messages":[],"max_tokens":2}"#, None).unwrap();
        let v: Value =
            serde_json::from_slice(&chat_completion_body("chatcmpl-mock-1", 5, "gpt-x", &g))
                .unwrap();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["message"]["content"], "tok0 tok1");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["usage"]["completion_tokens"], 2);
        assert_eq!(v["usage"]["total_tokens"], 3);
        let e = parse_embeddings(br#"{"input":"abc"}"#, None).unwrap();
        let v: Value = serde_json::from_slice(&embeddings_body("m", &e)).unwrap();
        assert_eq!(
            v["data"][0]["embedding"].as_array().unwrap().len(),
            EMBEDDING_DIMS
        );
        assert_eq!(v["usage"], json!({"prompt_tokens": 1, "total_tokens": 1}));
    }

    #[test]
    fn fault_queue_is_fifo_with_counts_and_paths() {
        let mut q = FaultQueue::default();
        let status = |s| Fault::Status {
            status: s,
            retry_after: None,
        };
        q.push(QueuedFault {
            fault: status(503),
            remaining: 2,
            path: None,
        });
        q.push(QueuedFault {
            fault: Fault::DropConnection,
            remaining: 1,
            path: Some("/v1/embeddings".into()),
        });
        q.push(QueuedFault {
            fault: status(429),
            remaining: 1,
            path: None,
        });
        assert_eq!(q.pending(), 4);
        assert_eq!(q.take("/v1/chat/completions"), Some(status(503)));
        assert_eq!(q.take("/v1/chat/completions"), Some(status(503)));
        // the embeddings-only fault is skipped for other paths
        assert_eq!(q.take("/v1/chat/completions"), Some(status(429)));
        assert_eq!(q.take("/v1/chat/completions"), None);
        assert_eq!(q.take("/v1/embeddings"), Some(Fault::DropConnection));
        assert_eq!(q.pending(), 0);
    }

    #[test]
    fn fault_specs_are_validated() {
        let (lat, f) = parse_faults(br#"{"status":503,"count":3}"#).unwrap();
        assert_eq!(lat, None);
        assert_eq!(f[0].remaining, 3);
        let (_, f) = parse_faults(br#"{"stall_ms":10}"#).unwrap();
        assert_eq!(
            f[0].fault,
            Fault::Stall {
                after_chunks: 0,
                stall_ms: 10
            }
        );
        let (_, f) = parse_faults(br#"{"stall_after_chunks":2}"#).unwrap();
        assert_eq!(
            f[0].fault,
            Fault::Stall {
                after_chunks: 2,
                stall_ms: DEFAULT_STALL_MS
            }
        );
        let (lat, f) = parse_faults(br#"{"latency_ms":250}"#).unwrap();
        assert_eq!((lat, f.len()), (Some(250), 0));
        let (_, f) =
            parse_faults(br#"[{"error_body":"<html>"},{"disconnect_after_chunks":1}]"#).unwrap();
        assert_eq!(f.len(), 2);
        assert!(matches!(f[0].fault, Fault::RawError { status: 500, .. }));
        for bad in [
            &br#"{}"#[..],
            br#"{"status":503,"disconnect_after_chunks":1}"#,
            br#"{"error_body":"x","stall_ms":1}"#,
            br#"{"status":99}"#,
            br#"{"status":503,"count":0}"#,
            br#"{"stauts":503}"#,
            br#"{"disconnect_after_chunks":1,"retry_after":2}"#,
            br#"[{"status":503},{"bogus":1}]"#,
            b"nope",
            b"3",
        ] {
            assert!(
                parse_faults(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn routing() {
        assert_eq!(
            route(&Method::POST, "/v1/chat/completions"),
            Route::Chat(None)
        );
        assert_eq!(route(&Method::GET, "/v1/chat/completions"), Route::NotFound);
        assert_eq!(route(&Method::GET, "/v1/models"), Route::Models);
        assert_eq!(route(&Method::GET, "/v1/models/abc"), Route::Model("abc"));
        assert_eq!(
            route(&Method::POST, "/openai/deployments/gpt4/chat/completions"),
            Route::Chat(Some("gpt4"))
        );
        assert_eq!(route(&Method::POST, "/v1/foo"), Route::NotFound);
    }

    #[test]
    fn embeddings_are_deterministic_unit_vectors() {
        let a = embed(b"hello");
        assert_eq!(a, embed(b"hello"));
        assert_ne!(a, embed(b"hellp"));
        let norm: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
    }

    #[test]
    fn base64_matches_reference() {
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"f"), "Zg==");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_encode(b"foo"), "Zm9v");
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn recorded_headers_join_duplicates() {
        let mut headers = HeaderMap::new();
        headers.append("x-a", "1".parse().unwrap());
        headers.append("x-a", "2".parse().unwrap());
        headers.insert("authorization", "Bearer k".parse().unwrap());
        let r = RecordedRequest {
            method: Method::POST,
            path: "/v1/chat/completions".into(),
            query: None,
            headers,
            body_bytes: 0,
            body_sha256: Sha256::digest(b"").into(),
            model: Some("m".into()),
        };
        let v = r.to_json();
        assert_eq!(v["headers"]["x-a"], "1, 2");
        assert_eq!(v["headers"]["authorization"], "Bearer k");
        assert_eq!(
            v["body_sha256"],
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
