//! Runestone: an OpenAI-compatible LLM gateway built on Cloudflare's Pingora.
//!
//! # Layout
//!
//! Each module owns one concern, and dependencies point one way: the
//! domain modules (config, auth, limits, cost, upstream, providers,
//! overflow, ...) know nothing of Pingora's proxy phases or its service
//! traits; `gateway` (the `ProxyHttp` glue), `services` (background-service
//! adapters) and `server` put them together. The pure parts (config
//! validation, GCRA and limits, usage metering, the failover decision, the
//! breaker, provider adapters and translation, body rewriting, redaction,
//! the Redis scripts' arguments and replies, the in-process job store) are
//! unit-tested without sockets; what needs Pingora, Redis or a provider is
//! tested through real processes in `tests/`.
//!
//! | module     | owns |
//! |------------|------|
//! | [`config`] | `config/`: the file format (`raw`), `${ENV}` (`env`), validation (`validate`, `tenants`) into the [`config::Config`] model that cannot be invalid, key digests, callback URLs, secrets |
//! | [`auth`]   | API key -> tenant lookup by digest (the key index), presented credentials, the failed-auth throttle, the client address behind trusted proxies |
//! | [`gcra`]   | the rate algorithm (GCRA over a minute) shared by limits and the auth throttle |
//! | [`ids`]    | unguessable request, job and lease ids (CSPRNG) |
//! | [`openai`] | `openai/`: the request fields the gateway reads and the limits bodies keep (`request`), the body sent upstream (`rewrite`), the OpenAI-shaped error (`error`), endpoints |
//! | [`limits`] | `limits/`: tenant admission (RPM/TPM, concurrency, budgets), settlement and release; in process (`local`) or in Redis (`redis/`: scripts, group-commit batcher, the ledger of what is owed, maintenance); accounting periods |
//! | [`cost`]   | `cost/`: usage from JSON answers and SSE streams (`stream`), estimates, prices |
//! | [`upstream`] | `upstream/`: providers as Pingora load balancers, DNS discovery and health checks (`discovery`), circuit breakers (`breaker`), the failover decision (`failover`), backend choice |
//! | [`providers`] | `providers/`: one adapter per provider kind (`openai`, `azure`, `anthropic/` with its translation): paths, credentials, headers, endpoints served, translation |
//! | [`redact`] | keeps a provider's key out of everything forwarded to clients (raw or JSON-escaped, across chunks) |
//! | [`overflow`] | `overflow/`: the queue (`queue`), async jobs and callbacks (`jobs`), the in-process job store (`local_jobs`), the drain (`drain`) |
//! | [`cache`] | `cache/`: the response cache: keys (`key`), stored answers replayed as JSON or streams (`replay`), coalescing identical requests (`flight`), in process or in Redis |
//! | [`metrics`] | every Prometheus metric handle, in one place |
//! | [`telemetry`] | `telemetry/`: OpenTelemetry spans, W3C trace context and sampling (`context`), OTLP's wire format (`otlp`), the batch exporter (`export`) |
//! | [`connections`] | connections to providers and outbound URLs, kept between requests in Pingora's pool (taken out without the race Pingora 0.9's connector has) |
//! | [`outbound`] | POSTs to URLs the operator configured (job callbacks, the trace collector) |
//! | [`admin`]  | locally answered endpoints: `/health`, `/ready`, `/v1/models`, `/v1/usage` |
//! | [`redis_conn`] | the one Redis connection, shared by limits and the overflow queue |
//! | [`gateway`] | `gateway/`: the Pingora `ProxyHttp` implementation, by request stage (routes, admission, jobs, forwarding, responses, accounting, access log) |
//! | [`reload`] | config reload: validate, then a graceful upgrade onto the new config |
//! | [`services`] | Pingora background-service adapters over the domain's loops (drain, Redis upkeep, reload) |
//! | [`server`] | builds the Pingora server (API listener, metrics listener, background services) |
#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod cache;
pub mod config;
pub mod connections;
pub mod cost;
pub mod gateway;
pub mod gcra;
pub mod ids;
pub(crate) mod json;
pub mod limits;
pub mod metrics;
pub mod openai;
pub mod outbound;
pub mod overflow;
pub mod providers;
pub mod redact;
pub mod redis_conn;
pub mod reload;
pub mod server;
pub mod services;
pub mod telemetry;
pub mod upstream;

/// Takes a lock even when a thread panicked holding it: what the crate's
/// mutexes guard (counters, queues, buffers) is whole between steps.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
