//! Runestone: an OpenAI-compatible LLM gateway built on Cloudflare's Pingora.
//!
//! # Layout
//!
//! Each module owns one concern; only `gateway` and `server` know about
//! Pingora's proxy phases, the rest is plain Rust that is unit-tested
//! without sockets.
//!
//! | module     | owns |
//! |------------|------|
//! | [`config`] | the YAML schema, `${ENV}` interpolation, validation into a [`config::Config`] that cannot be invalid |
//! | [`auth`]   | API key -> tenant lookup by SHA-256 digest |
//! | [`gcra`]   | the rate algorithm (GCRA over a minute) shared by limits and the auth throttle |
//! | [`ids`]    | unguessable request, job and lease ids (CSPRNG) |
//! | [`openai`] | wire types the gateway reads, the OpenAI-shaped error body, body rewriting |
//! | [`limits`] | tenant admission: RPM/TPM (GCRA), concurrency, budgets; in-process or in Redis |
//! | [`cost`]   | usage extraction from JSON and SSE responses, estimates, prices |
//! | [`upstream`] | providers as Pingora load balancers (DNS discovery, health checks), circuit breakers, backend choice |
//! | [`metrics`] | every Prometheus metric handle, in one place |
//! | [`providers`] | per-kind adapters: the Anthropic Messages translation |
//! | [`redact`] | keeps a provider's key out of everything forwarded to clients (raw or JSON-escaped, across chunks) |
//! | [`overflow`] | the overflow queue: parked requests, async jobs, the drain service |
//! | [`admin`]  | locally answered endpoints: `/health`, `/ready`, `/v1/models` |
//! | [`gateway`] | the Pingora `ProxyHttp` implementation: each phase calls into the modules above |
//! | [`redis_conn`] | the one Redis connection, shared by limits and the overflow queue |
//! | [`reload`] | config reload: validate, then a graceful upgrade onto the new config |
//! | [`services`] | Pingora background-service adapters over the domain's loops (drain, Redis upkeep, reload) |
//! | [`server`] | builds the Pingora server (API listener, metrics listener, background services) |
#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod config;
pub mod cost;
pub mod gateway;
pub mod gcra;
pub mod ids;
pub mod limits;
pub mod metrics;
pub mod openai;
pub mod overflow;
pub mod providers;
pub mod redact;
pub mod redis_conn;
pub mod reload;
pub mod server;
pub mod services;
pub mod upstream;
