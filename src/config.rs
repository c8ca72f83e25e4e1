//! The YAML configuration: schema, `${ENV}` interpolation and validation.
//!
//! The file format (the `Raw*` serde structs, every one with
//! `deny_unknown_fields`) is kept apart from [`Config`], the validated model
//! the gateway runs on: provider references are resolved to indices, keys
//! compiled into a [`KeyIndex`], URLs parsed. Loading never stops at the
//! first mistake: every problem is collected with the path of the key at
//! fault (`tenants[1].keys[0]: ...`) so `runestone check` can list them all.

use crate::auth::{parse_configured_key, KeyIndex};
use serde::Deserialize;
use serde_yaml::Value;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// One problem found in a config file, with the path of the key at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where: `providers[0].base_url`, or the empty string for the whole file.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file that was read.
    pub file: String,
    /// The problems, in file order as far as possible.
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} problem(s)", self.file, self.problems.len())?;
        for problem in &self.problems {
            write!(f, "\n  {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// A string that must never be printed: provider keys.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that sends it upstream.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("*****")
    }
}

// ---------------------------------------------------------------- file format

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: String,
    #[serde(default)]
    metrics_listen: Option<String>,
    #[serde(default)]
    threads: Option<usize>,
    #[serde(default)]
    max_request_body_bytes: Option<usize>,
    #[serde(default)]
    max_request_header_bytes: Option<usize>,
    #[serde(default)]
    grace_period_seconds: Option<u64>,
    #[serde(default)]
    pid_file: Option<String>,
    #[serde(default)]
    upgrade_sock: Option<String>,
    #[serde(default)]
    tls: Option<RawTls>,
    #[serde(default)]
    access_log: Option<bool>,
    #[serde(default)]
    log_level: Option<String>,
    #[serde(default)]
    auth_failures_per_minute: Option<u32>,
    #[serde(default)]
    trusted_proxies: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: String,
    key: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    name: String,
    #[serde(default = "default_kind")]
    kind: String,
    base_url: String,
    #[serde(default)]
    api_key: Option<String>,
    #[serde(default)]
    weight: Option<u32>,
    #[serde(default)]
    api_version: Option<String>,
    #[serde(default)]
    health_check: Option<RawHealthCheck>,
    #[serde(default)]
    timeouts: Option<RawTimeouts>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealthCheck {
    path: String,
    #[serde(default)]
    interval_seconds: Option<u64>,
    #[serde(default)]
    healthy_threshold: Option<usize>,
    #[serde(default)]
    unhealthy_threshold: Option<usize>,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    #[serde(default)]
    connect_ms: Option<u64>,
    #[serde(default)]
    first_byte_ms: Option<u64>,
    #[serde(default)]
    idle_ms: Option<u64>,
    #[serde(default)]
    total_ms: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawBreaker {
    #[serde(default)]
    consecutive_failures: Option<u32>,
    #[serde(default)]
    open_seconds: Option<u64>,
    #[serde(default)]
    max_open_seconds: Option<u64>,
    #[serde(default)]
    half_open_probes: Option<u32>,
    #[serde(default)]
    probe_timeout_seconds: Option<u64>,
    #[serde(default)]
    rate_limit_cooldown_seconds: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFailover {
    #[serde(default)]
    max_attempts: Option<usize>,
}

fn default_kind() -> String {
    "openai".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    provider: String,
    #[serde(default)]
    model: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    name: String,
    #[serde(default)]
    strategy: Option<String>,
    targets: Vec<RawTarget>,
    #[serde(default)]
    fallbacks: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenant {
    id: String,
    keys: Vec<String>,
    #[serde(default)]
    models: Option<Vec<String>>,
    #[serde(default)]
    limits: Option<RawLimits>,
    #[serde(default)]
    overflow: Option<RawTenantOverflow>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenantOverflow {
    #[serde(default)]
    enabled: bool,
    #[serde(default)]
    max_wait_seconds: Option<u64>,
    #[serde(default)]
    max_parked: Option<usize>,
    #[serde(default)]
    callbacks: Option<RawCallbacks>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCallbacks {
    allowed_urls: Vec<String>,
    secret: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawJobs {
    #[serde(default)]
    result_ttl_seconds: Option<u64>,
    #[serde(default)]
    visibility_timeout_seconds: Option<u64>,
    #[serde(default)]
    in_process_max_jobs: Option<usize>,
    #[serde(default)]
    in_process_max_bytes: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    #[serde(default)]
    requests_per_minute: Option<u32>,
    #[serde(default)]
    tokens_per_minute: Option<u64>,
    #[serde(default)]
    max_concurrent: Option<u32>,
    #[serde(default)]
    budget_usd: Option<RawBudget>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBudget {
    amount: f64,
    period: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedis {
    url: String,
    #[serde(default)]
    key_prefix: Option<String>,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrice {
    input: f64,
    output: f64,
    #[serde(default)]
    cached_input: Option<f64>,
}

const TOP_LEVEL_KEYS: &[&str] = &[
    "server",
    "redis",
    "providers",
    "models",
    "pricing",
    "circuit_breaker",
    "failover",
    "jobs",
    "tenants",
];

// ---------------------------------------------------------------- validated model

/// Server settings, defaults applied.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// The API listener address.
    pub listen: SocketAddr,
    /// The Prometheus listener address, if any.
    pub metrics_listen: Option<SocketAddr>,
    /// Pingora worker threads.
    pub threads: usize,
    /// Largest request body accepted; 413 past it.
    pub max_request_body_bytes: usize,
    /// Largest request head (request line and headers) accepted; 431 past it.
    pub max_request_header_bytes: usize,
    /// Seconds a graceful shutdown or upgrade waits for in-flight requests.
    pub grace_period_seconds: u64,
    /// Pingora's pid file.
    pub pid_file: String,
    /// Pingora's socket for handing listeners to a new binary on upgrade.
    pub upgrade_sock: String,
    /// Serve the API over HTTPS with this certificate chain and key (PEM).
    pub tls: Option<TlsFiles>,
    /// Write one JSON access log line per request to stdout.
    pub access_log: bool,
    /// Log level when `RUST_LOG` is not set (`info`, `debug`, ...).
    pub log_level: String,
    /// Failed authentications allowed per client address per minute (0: no
    /// limit).
    pub auth_failures_per_minute: u32,
    /// Proxies (CIDRs) whose `Forwarded` / `X-Forwarded-For` headers name
    /// the client address; every other peer is the client itself.
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

/// PEM files for the HTTPS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain.
    pub cert: String,
    /// Private key.
    pub key: String,
}

/// Default for `server.max_request_body_bytes`: 4 MiB.
pub const DEFAULT_MAX_REQUEST_BODY_BYTES: usize = 4 * 1024 * 1024;

/// Default for `server.max_request_header_bytes`: 32 KiB, as many servers
/// allow; the OpenAI SDKs send well under 2 KiB.
pub const DEFAULT_MAX_REQUEST_HEADER_BYTES: usize = 32 * 1024;

/// The API a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    /// Any OpenAI-compatible base URL; requests pass through.
    OpenAi,
    /// Azure OpenAI: deployment URLs, the `api-key` header, `api-version`.
    Azure,
    /// The Anthropic Messages API, translated to and from OpenAI's.
    Anthropic,
}

/// A provider's base URL, split into what a connection needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    /// `https`?
    pub tls: bool,
    /// Host name or IP literal (without brackets), also used as SNI.
    pub host: String,
    /// TCP port (explicit or the scheme's default).
    pub port: u16,
    /// The path prefix without a trailing slash (`/v1`).
    pub path: String,
    /// The `Host` header value: `host` or `host:port` when not the default.
    pub authority: String,
}

impl BaseUrl {
    /// Parses and checks an `http(s)://host[:port]/path` URL.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let url = url::Url::parse(raw).map_err(|e| format!("'{raw}' is not a valid URL: {e}"))?;
        let tls = match url.scheme() {
            "http" => false,
            "https" => true,
            other => {
                return Err(format!(
                    "scheme '{other}' is not supported; use http or https"
                ))
            }
        };
        let host = match url.host() {
            Some(url::Host::Domain(d)) => d.to_string(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            None => return Err(format!("'{raw}' has no host")),
        };
        if url.query().is_some() || url.fragment().is_some() {
            return Err(format!("'{raw}' must not have a query or fragment"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err("credentials belong in api_key, not in the URL".into());
        }
        let port = url
            .port_or_known_default()
            .expect("http and https have default ports");
        let authority = match (url.port(), url.host()) {
            (Some(p), Some(url::Host::Ipv6(ip))) => format!("[{ip}]:{p}"),
            (None, Some(url::Host::Ipv6(ip))) => format!("[{ip}]"),
            (Some(p), _) => format!("{host}:{p}"),
            (None, _) => host.clone(),
        };
        Ok(BaseUrl {
            tls,
            host,
            port,
            path: url.path().trim_end_matches('/').to_string(),
            authority,
        })
    }
}

/// A validated provider.
#[derive(Debug, Clone)]
pub struct ProviderSettings {
    /// Unique name, used in metric labels and `x-runestone-provider`.
    pub name: String,
    /// The API it speaks.
    pub kind: ProviderKind,
    /// Where it is.
    pub base_url: BaseUrl,
    /// The gateway's key for it, if it needs one.
    pub api_key: Option<Secret>,
    /// Relative share for weighted routing.
    pub weight: u32,
    /// Azure's `api-version` query parameter.
    pub api_version: Option<String>,
    /// Active health check, when configured.
    pub health_check: Option<HealthCheckSettings>,
    /// Timeouts for every request to it.
    pub timeouts: Timeouts,
}

/// An active health check: `GET base_url + path` must answer 200.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckSettings {
    /// Path relative to the base URL (`/models`).
    pub path: String,
    /// Time between checks.
    pub interval: Duration,
    /// Consecutive passes that make an unhealthy backend healthy.
    pub healthy_threshold: usize,
    /// Consecutive failures that make a healthy backend unhealthy.
    pub unhealthy_threshold: usize,
    /// Bound on one check.
    pub timeout: Duration,
}

/// Timeouts for requests to one provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP (and TLS) connect.
    pub connect: Duration,
    /// From the request sent to the response header.
    pub first_byte: Duration,
    /// Longest gap between two chunks of the response body.
    pub idle: Duration,
    /// The whole exchange.
    pub total: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(5),
            first_byte: Duration::from_secs(120),
            idle: Duration::from_secs(60),
            total: Duration::from_secs(600),
        }
    }
}

/// Circuit breaker settings, shared by every backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Consecutive failures (5xx, connect errors, timeouts) that open it.
    pub consecutive_failures: u32,
    /// How long it stays open the first time; doubled on each re-open.
    pub open: Duration,
    /// Cap on the doubled open time.
    pub max_open: Duration,
    /// Trial requests let through when half-open.
    pub half_open_probes: u32,
    /// A probe taking longer than this counts as failed.
    pub probe_timeout: Duration,
    /// Cool-down after a provider's own 429.
    pub rate_limit_cooldown: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            consecutive_failures: 5,
            open: Duration::from_secs(30),
            max_open: Duration::from_secs(300),
            half_open_probes: 1,
            probe_timeout: Duration::from_secs(30),
            rate_limit_cooldown: Duration::from_secs(5),
        }
    }
}

/// How a model's targets are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Each request goes to the next target in turn.
    RoundRobin,
    /// Targets share requests in proportion to their provider's `weight`.
    Weighted,
    /// The target with the lowest moving average of time to first byte.
    LeastLatency,
    /// The first target that can serve.
    Priority,
    /// The target with the lowest price (`pricing`), first in order on ties.
    Cheapest,
}

/// One place a public model can be served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Index into [`Config::providers`].
    pub provider: usize,
    /// The model name the provider knows.
    pub model: String,
    /// What serving it costs: the `provider/model` price, else the public
    /// model's; resolved once, at load.
    pub price: Option<Price>,
}

/// A public model name and where it is served.
#[derive(Debug, Clone)]
pub struct ModelRoute {
    /// The public name clients send.
    pub name: String,
    /// How targets are chosen.
    pub strategy: Strategy,
    /// Where it can be served, in config order.
    pub targets: Vec<Target>,
    /// Other public models (indices into [`Config::models`]) to try, in
    /// order, when no target can serve.
    pub fallbacks: Vec<usize>,
}

/// A validated tenant.
#[derive(Debug, Clone)]
pub struct TenantSettings {
    /// Unique id, used in metric labels and logs.
    pub id: String,
    /// The public models it may use; `None` means all.
    pub allowed_models: Option<HashSet<String>>,
    /// Its admission limits; all `None` means unlimited.
    pub limits: TenantLimits,
    /// Whether and how requests over its limits wait instead of failing.
    pub overflow: TenantOverflow,
}

/// A tenant's overflow queue settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantOverflow {
    /// Park requests over a limit instead of refusing them.
    pub enabled: bool,
    /// Longest a parked request waits for admission.
    pub max_wait: Duration,
    /// Most requests parked for the tenant at once (async jobs included).
    pub max_parked: usize,
    /// Where async job results may be POSTed, and the signing secret.
    pub callbacks: Option<Callbacks>,
}

/// A tenant's allowed job callbacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Callbacks {
    /// Allowed URLs, normalised: an exact URL, or a prefix ending in `/`.
    pub allowed_urls: Vec<CallbackUrl>,
    /// The HMAC-SHA256 key results are signed with.
    pub secret: Secret,
}

impl Callbacks {
    /// The URL a job may post its result to, normalised, when `raw` is on
    /// the allow-list: same scheme, host and port, and either the same path
    /// and query as an exact entry or a path under a prefix entry (the
    /// prefix ends in `/`, so the match is on whole segments). `None` when
    /// `raw` is not a plain URL (see [`CallbackUrl::parse`]) or not allowed.
    pub fn allowed(&self, raw: &str) -> Option<CallbackUrl> {
        let url = CallbackUrl::parse(raw).ok()?;
        self.allowed_urls
            .iter()
            .any(|allowed| url.is_under(allowed))
            .then_some(url)
    }
}

/// A callback URL as the gateway delivers to it: http(s), no user info, no
/// fragment, and nothing a normaliser would change (no dot segments, no
/// encoded dots, slashes or backslashes, no backslashes, no control
/// characters or spaces), so the URL checked is the URL delivered to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallbackUrl(url::Url);

impl CallbackUrl {
    /// Parses and checks a callback URL; why it is refused otherwise.
    pub fn parse(raw: &str) -> Result<Self, String> {
        if let Some(c) = raw
            .chars()
            .find(|c| c.is_control() || c.is_whitespace() || !c.is_ascii())
        {
            return Err(format!("contains the character {c:?}"));
        }
        if raw.contains('\\') {
            return Err("contains a backslash".into());
        }
        if raw.contains('#') {
            return Err("has a fragment".into());
        }
        let lower = raw.to_ascii_lowercase();
        if ["%2e", "%2f", "%5c", "%00"]
            .iter()
            .any(|e| lower.contains(e))
        {
            return Err("encodes a dot, slash, backslash or NUL".into());
        }
        let url = url::Url::parse(raw).map_err(|e| e.to_string())?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err("must be http or https".into());
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err("must not carry a user name or password".into());
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err("has no host".into());
        }
        // The path and query exactly as written: a URL the parser had to
        // normalise (dot segments, stray characters) is refused.
        let after_scheme = raw.split_once("://").map_or("", |(_, rest)| rest);
        let raw_path = after_scheme
            .find(['/', '?'])
            .map_or("", |at| &after_scheme[at..]);
        let (raw_path, raw_query) = match raw_path.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (raw_path, None),
        };
        let path_as_parsed = if raw_path.is_empty() { "/" } else { raw_path };
        if url.path() != path_as_parsed || url.query() != raw_query {
            return Err("has a path the URL parser would change (dot segments or encoding)".into());
        }
        if raw_path
            .split('/')
            .any(|segment| segment == "." || segment == "..")
        {
            return Err("has a dot segment".into());
        }
        Ok(CallbackUrl(url))
    }

    /// The normalised URL.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// Whether this URL is `allowed` (exact) or under it (a prefix entry).
    fn is_under(&self, allowed: &CallbackUrl) -> bool {
        let (a, b) = (&self.0, &allowed.0);
        if a.scheme() != b.scheme()
            || a.host_str() != b.host_str()
            || a.port_or_known_default() != b.port_or_known_default()
        {
            return false;
        }
        if b.path().ends_with('/') && b.query().is_none() {
            a.path().starts_with(b.path())
        } else {
            a.path() == b.path() && a.query() == b.query()
        }
    }
}

impl Default for TenantOverflow {
    fn default() -> Self {
        TenantOverflow {
            enabled: false,
            max_wait: Duration::from_secs(30),
            max_parked: 1000,
            callbacks: None,
        }
    }
}

/// Async job settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobSettings {
    /// How long a finished job's result is kept.
    pub result_ttl: Duration,
    /// How long a job claimed by an instance that stopped answering stays
    /// claimed before another instance re-queues it.
    pub visibility_timeout: Duration,
    /// Without Redis: the most jobs (queued, running or finished) held in
    /// process; submissions past it are refused with 503.
    pub in_process_max_jobs: usize,
    /// Without Redis: the most bytes of requests and results held in
    /// process; submissions past it are refused with 503.
    pub in_process_max_bytes: usize,
}

impl Default for JobSettings {
    fn default() -> Self {
        JobSettings {
            result_ttl: Duration::from_secs(86_400),
            visibility_timeout: Duration::from_secs(60),
            in_process_max_jobs: 10_000,
            in_process_max_bytes: 256 * 1024 * 1024,
        }
    }
}

/// Money is kept in integer pico-dollars (1e-12 USD) so that sums are exact:
/// a price of $0.075 per 1M tokens is 75,000 pUSD per token, and an `i64`
/// holds over nine million dollars.
pub const PICO_PER_USD: f64 = 1e12;

/// A tenant's admission limits.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TenantLimits {
    /// Requests admitted per minute (GCRA, burst of the whole minute).
    pub requests_per_minute: Option<u32>,
    /// Tokens admitted per minute (GCRA on estimated, then settled, tokens).
    pub tokens_per_minute: Option<u64>,
    /// Requests in flight at once.
    pub max_concurrent: Option<u32>,
    /// Spend allowed per period.
    pub budget: Option<Budget>,
}

impl TenantLimits {
    /// Whether any limit is set.
    pub fn is_limited(&self) -> bool {
        *self != TenantLimits::default()
    }
}

/// A spending cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// The cap, in pico-dollars.
    pub amount_pusd: i64,
    /// The period it applies to.
    pub period: BudgetPeriod,
}

/// The period a budget (and `/v1/usage`) covers, in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetPeriod {
    /// The current UTC day.
    Daily,
    /// The current UTC month.
    Monthly,
    /// All time.
    Total,
}

impl BudgetPeriod {
    /// The name used in config and `/v1/usage`.
    pub fn name(self) -> &'static str {
        match self {
            BudgetPeriod::Daily => "daily",
            BudgetPeriod::Monthly => "monthly",
            BudgetPeriod::Total => "total",
        }
    }
}

/// Prices of one public model, in pico-dollars per token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Price {
    /// Per prompt token not served from the provider's cache.
    pub input: i64,
    /// Per completion token.
    pub output: i64,
    /// Per cached prompt token (defaults to the input price).
    pub cached_input: i64,
}

/// Shared state in Redis.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `redis://host:port/db` (credentials allowed; never logged).
    pub url: Secret,
    /// Prefix of every key (`runestone:{tenant}:...`).
    pub key_prefix: String,
    /// Bound on every Redis call.
    pub timeout: std::time::Duration,
}

impl TenantSettings {
    /// Whether this tenant may use `model`.
    pub fn may_use(&self, model: &str) -> bool {
        self.allowed_models
            .as_ref()
            .is_none_or(|allowed| allowed.contains(model))
    }
}

/// The validated configuration the gateway runs on.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listener and process settings.
    pub server: ServerSettings,
    /// Providers, in config order.
    pub providers: Vec<ProviderSettings>,
    /// Model routes, in config order.
    pub models: Vec<ModelRoute>,
    /// Tenants, in config order.
    pub tenants: Vec<TenantSettings>,
    /// Key digest -> tenant index.
    pub keys: KeyIndex,
    /// Prices per public model name.
    pub pricing: HashMap<String, Price>,
    /// Shared state, when configured.
    pub redis: Option<RedisSettings>,
    /// Circuit breaker settings.
    pub breaker: BreakerSettings,
    /// Most attempts one request makes, across targets and fallbacks.
    pub max_attempts: usize,
    /// Async job settings.
    pub jobs: JobSettings,
    /// Secrets written in the file itself rather than taken from `${ENV}`
    /// (or, for tenant keys, given as digests): their key paths.
    pub literal_secrets: Vec<String>,
    /// Warnings about the file itself (its permissions), found at load.
    pub file_warnings: Vec<String>,
    model_index: HashMap<String, usize>,
}

impl Config {
    /// Reads, interpolates and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            problems: vec![Problem {
                path: String::new(),
                message: format!("cannot read the file: {e}"),
            }],
        })?;
        let mut config =
            Self::from_yaml(&text, |name| std::env::var(name).ok()).map_err(|problems| {
                ConfigError {
                    file: file.clone(),
                    problems,
                }
            })?;
        if let Some(warning) = permission_warning(path, &config.literal_secrets) {
            config.file_warnings.push(warning);
        }
        Ok(config)
    }

    /// Parses and validates YAML text; `env` looks up `${VAR}` values.
    pub fn from_yaml(
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, Vec<Problem>> {
        let mut problems = Vec::new();
        let mut root: Value = serde_yaml::from_str(text).map_err(|e| {
            vec![Problem {
                path: String::new(),
                message: format!("not valid YAML: {e}"),
            }]
        })?;
        let literal_secrets = literal_secrets(&root);
        interpolate(&mut root, "", &env, &mut problems);
        let Value::Mapping(root) = root else {
            problems.push(problem("", "the file must be a YAML mapping"));
            return Err(problems);
        };
        for key in root.keys() {
            let name = key.as_str().unwrap_or("?");
            if !TOP_LEVEL_KEYS.contains(&name) {
                problems.push(problem(
                    name,
                    format!("unknown key; expected one of {TOP_LEVEL_KEYS:?}"),
                ));
            }
        }
        let section = |name: &str| root.get(name).cloned().unwrap_or(Value::Null);

        let server = match section("server") {
            Value::Null => {
                problems.push(problem("server", "missing section"));
                None
            }
            value => deserialize::<RawServer>(value, "server", &mut problems)
                .and_then(|raw| validate_server(raw, &mut problems)),
        };
        let raw_providers: Vec<Option<RawProvider>> =
            list(section("providers"), "providers", &mut problems);
        let raw_models: Vec<Option<RawModel>> = list(section("models"), "models", &mut problems);
        let raw_tenants: Vec<Option<RawTenant>> =
            list(section("tenants"), "tenants", &mut problems);

        let (providers, provider_index) = validate_providers(raw_providers, &mut problems);
        let (mut models, model_index) = validate_models(raw_models, &provider_index, &mut problems);
        let (tenants, keys) = validate_tenants(raw_tenants, &model_index, &mut problems);
        let pricing = validate_pricing(section("pricing"), &model_index, &providers, &mut problems);
        for route in &mut models {
            for target in &mut route.targets {
                // A provider that failed validation has no entry here (and
                // the config is refused anyway).
                let Some(provider) = providers.get(target.provider) else {
                    continue;
                };
                target.price = pricing
                    .get(&format!("{}/{}", provider.name, target.model))
                    .or_else(|| pricing.get(&route.name))
                    .copied();
            }
        }
        let breaker = match section("circuit_breaker") {
            Value::Null => Some(BreakerSettings::default()),
            value => deserialize::<RawBreaker>(value, "circuit_breaker", &mut problems)
                .map(|raw| validate_breaker(raw, &mut problems)),
        };
        let max_attempts = match section("failover") {
            Value::Null => Some(3),
            value => deserialize::<RawFailover>(value, "failover", &mut problems).map(|raw| {
                let n = raw.max_attempts.unwrap_or(3);
                if !(1..=16).contains(&n) {
                    problems.push(problem("failover.max_attempts", "must be between 1 and 16"));
                }
                n
            }),
        };
        let redis = match section("redis") {
            Value::Null => None,
            value => deserialize::<RawRedis>(value, "redis", &mut problems)
                .and_then(|raw| validate_redis(raw, &mut problems)),
        };

        let jobs = match section("jobs") {
            Value::Null => Some(JobSettings::default()),
            value => deserialize::<RawJobs>(value, "jobs", &mut problems).map(|raw| {
                let d = JobSettings::default();
                let ttl = raw.result_ttl_seconds.unwrap_or(d.result_ttl.as_secs());
                let visibility = raw
                    .visibility_timeout_seconds
                    .unwrap_or(d.visibility_timeout.as_secs());
                if ttl == 0 {
                    problems.push(problem("jobs.result_ttl_seconds", "must be at least 1"));
                }
                if visibility < 2 {
                    problems.push(problem(
                        "jobs.visibility_timeout_seconds",
                        "must be at least 2",
                    ));
                }
                let max_jobs = raw.in_process_max_jobs.unwrap_or(d.in_process_max_jobs);
                let max_bytes = raw.in_process_max_bytes.unwrap_or(d.in_process_max_bytes);
                if max_jobs == 0 {
                    problems.push(problem("jobs.in_process_max_jobs", "must be at least 1"));
                }
                if max_bytes < 1024 {
                    problems.push(problem(
                        "jobs.in_process_max_bytes",
                        "must be at least 1024",
                    ));
                }
                JobSettings {
                    result_ttl: Duration::from_secs(ttl),
                    visibility_timeout: Duration::from_secs(visibility),
                    in_process_max_jobs: max_jobs,
                    in_process_max_bytes: max_bytes,
                }
            }),
        };
        match (server, breaker, max_attempts, jobs) {
            (Some(server), Some(breaker), Some(max_attempts), Some(jobs))
                if problems.is_empty() =>
            {
                Ok(Config {
                    server,
                    providers,
                    models,
                    tenants,
                    keys,
                    pricing,
                    redis,
                    breaker,
                    max_attempts,
                    jobs,
                    literal_secrets,
                    file_warnings: Vec::new(),
                    model_index,
                })
            }
            _ => Err(problems),
        }
    }

    /// Things that work but deserve the operator's attention.
    pub fn warnings(&self) -> Vec<String> {
        self.models
            .iter()
            .filter(|m| !self.pricing.contains_key(&m.name))
            .map(|m| format!("pricing: model '{}' has no price; it is served and counted in tokens, at no cost", m.name))
            .chain(self.file_warnings.iter().cloned())
            .collect()
    }

    /// The route for a public model name, with its index in [`Config::models`].
    pub fn route(&self, model: &str) -> Option<(usize, &ModelRoute)> {
        self.model_index.get(model).map(|&i| (i, &self.models[i]))
    }
}

/// The key paths of secrets written in the file as they are: provider keys,
/// callback secrets and Redis passwords not taken from `${ENV}`, tenant keys
/// neither `${ENV}` nor `sha256:` digests.
fn literal_secrets(root: &Value) -> Vec<String> {
    let literal = |v: &Value| {
        v.as_str()
            .is_some_and(|s| !s.is_empty() && !s.contains("${"))
    };
    fn list(v: Option<&Value>) -> Vec<(usize, &Value)> {
        v.and_then(Value::as_sequence)
            .map(|items| items.iter().enumerate().collect())
            .unwrap_or_default()
    }
    let mut found = Vec::new();
    for (i, provider) in list(root.get("providers")) {
        if provider.get("api_key").is_some_and(literal) {
            found.push(format!("providers[{i}].api_key"));
        }
    }
    for (i, tenant) in list(root.get("tenants")) {
        for (j, key) in list(tenant.get("keys")) {
            if literal(key) && !key.as_str().is_some_and(|k| k.starts_with("sha256:")) {
                found.push(format!("tenants[{i}].keys[{j}]"));
            }
        }
        let secret = tenant
            .get("overflow")
            .and_then(|o| o.get("callbacks"))
            .and_then(|c| c.get("secret"));
        if secret.is_some_and(literal) {
            found.push(format!("tenants[{i}].overflow.callbacks.secret"));
        }
    }
    let redis_url = root.get("redis").and_then(|r| r.get("url"));
    if redis_url.is_some_and(|u| literal(u) && u.as_str().is_some_and(|u| u.contains('@'))) {
        found.push("redis.url".to_string());
    }
    found
}

/// A warning when the file holds literal secrets and others may read it.
fn permission_warning(path: &Path, literal_secrets: &[String]) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    if literal_secrets.is_empty() {
        return None;
    }
    let mode = std::fs::metadata(path).ok()?.permissions().mode();
    (mode & 0o044 != 0).then(|| {
        format!(
            "{}: holds plaintext secrets ({}) and is readable by {} (mode {:o}); chmod 600 it, or use sha256: digests and ${{ENV}} references",
            path.display(),
            literal_secrets.join(", "),
            if mode & 0o004 != 0 { "others" } else { "its group" },
            mode & 0o777
        )
    })
}

fn problem(path: &str, message: impl Into<String>) -> Problem {
    Problem {
        path: path.to_string(),
        message: message.into(),
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Replaces `${VAR}` in every string value; an unset variable is a problem
/// at the key that uses it.
fn interpolate(
    value: &mut Value,
    path: &str,
    env: &impl Fn(&str) -> Option<String>,
    problems: &mut Vec<Problem>,
) {
    match value {
        Value::String(s) if s.contains("${") => {
            let mut out = String::with_capacity(s.len());
            let mut rest = s.as_str();
            while let Some(start) = rest.find("${") {
                out.push_str(&rest[..start]);
                let after = &rest[start + 2..];
                let Some(end) = after.find('}') else {
                    problems.push(problem(path, "unterminated '${' in value"));
                    return;
                };
                let name = &after[..end];
                match env(name) {
                    Some(v) if !name.is_empty() => out.push_str(&v),
                    _ => {
                        problems.push(problem(
                            path,
                            format!("environment variable {name} is not set"),
                        ));
                        // Keep the reference, so later checks of this value
                        // do not add misleading follow-up problems.
                        out.push_str(&rest[start..start + 2 + end + 1]);
                    }
                }
                rest = &after[end + 1..];
            }
            out.push_str(rest);
            *s = out;
        }
        Value::Sequence(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                interpolate(item, &format!("{path}[{i}]"), env, problems);
            }
        }
        Value::Mapping(map) => {
            for (key, item) in map.iter_mut() {
                let key = key.as_str().unwrap_or("?").to_string();
                interpolate(item, &join(path, &key), env, problems);
            }
        }
        _ => {}
    }
}

fn deserialize<T: serde::de::DeserializeOwned>(
    value: Value,
    path: &str,
    problems: &mut Vec<Problem>,
) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(v) => Some(v),
        Err(e) => {
            let inner = e.path().to_string();
            let at = if inner == "." {
                path.to_string()
            } else {
                join(path, &inner)
            };
            problems.push(problem(&at, e.into_inner().to_string()));
            None
        }
    }
}

/// Deserialises each item of a list section on its own, so one bad item
/// does not hide the problems of the others.
fn list<T: serde::de::DeserializeOwned>(
    value: Value,
    path: &str,
    problems: &mut Vec<Problem>,
) -> Vec<Option<T>> {
    match value {
        Value::Null => Vec::new(),
        Value::Sequence(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| deserialize(item, &format!("{path}[{i}]"), problems))
            .collect(),
        _ => {
            problems.push(problem(path, "must be a list"));
            Vec::new()
        }
    }
}

fn validate_server(raw: RawServer, problems: &mut Vec<Problem>) -> Option<ServerSettings> {
    let before = problems.len();
    let addr =
        |value: &str, path: &str, problems: &mut Vec<Problem>| match value.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                problems.push(problem(
                    path,
                    format!("'{value}' is not an IP:port address"),
                ));
                None
            }
        };
    let listen = addr(&raw.listen, "server.listen", problems);
    let metrics_listen = raw
        .metrics_listen
        .as_deref()
        .and_then(|m| addr(m, "server.metrics_listen", problems));
    let threads = raw.threads.unwrap_or(2);
    if threads == 0 || threads > 1024 {
        problems.push(problem("server.threads", "must be between 1 and 1024"));
    }
    let max_request_body_bytes = raw
        .max_request_body_bytes
        .unwrap_or(DEFAULT_MAX_REQUEST_BODY_BYTES);
    let max_request_header_bytes = raw
        .max_request_header_bytes
        .unwrap_or(DEFAULT_MAX_REQUEST_HEADER_BYTES);
    if !(1024..=1024 * 1024).contains(&max_request_header_bytes) {
        problems.push(problem(
            "server.max_request_header_bytes",
            "must be between 1024 and 1048576 (Pingora reads at most 1 MiB of headers)",
        ));
    }
    let tls = raw.tls.map(|tls| {
        for (key, file) in [("cert", &tls.cert), ("key", &tls.key)] {
            if let Err(e) = std::fs::metadata(file) {
                problems.push(problem(
                    &format!("server.tls.{key}"),
                    format!("cannot read '{file}': {e}"),
                ));
            }
        }
        TlsFiles {
            cert: tls.cert,
            key: tls.key,
        }
    });
    let log_level = raw.log_level.unwrap_or_else(|| "info".into());
    if tracing_subscriber_level(&log_level).is_none() {
        problems.push(problem(
            "server.log_level",
            "must be one of error, warn, info, debug, trace",
        ));
    }
    if max_request_body_bytes == 0 {
        problems.push(problem(
            "server.max_request_body_bytes",
            "must be greater than 0",
        ));
    }
    let trusted_proxies = raw
        .trusted_proxies
        .iter()
        .enumerate()
        .filter_map(|(i, cidr)| {
            let parsed = cidr
                .parse::<ipnet::IpNet>()
                .or_else(|_| cidr.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
            parsed
                .map_err(|_| {
                    problems.push(problem(
                        &format!("server.trusted_proxies[{i}]"),
                        format!("'{cidr}' is not an address or CIDR (10.0.0.0/8, fd00::/8)"),
                    ))
                })
                .ok()
        })
        .collect();
    if problems.len() > before {
        return None;
    }
    let listen = listen?;
    Some(ServerSettings {
        trusted_proxies,
        listen,
        metrics_listen,
        threads,
        max_request_body_bytes,
        max_request_header_bytes,
        grace_period_seconds: raw.grace_period_seconds.unwrap_or(30),
        pid_file: raw
            .pid_file
            .unwrap_or_else(|| format!("/tmp/runestone-{}.pid", listen.port())),
        tls,
        access_log: raw.access_log.unwrap_or(true),
        auth_failures_per_minute: raw.auth_failures_per_minute.unwrap_or(60),
        log_level,
        upgrade_sock: raw
            .upgrade_sock
            .unwrap_or_else(|| format!("/tmp/runestone-{}.sock", listen.port())),
    })
}

/// Whether `level` is a log level name.
fn tracing_subscriber_level(level: &str) -> Option<&'static str> {
    ["error", "warn", "info", "debug", "trace"]
        .into_iter()
        .find(|l| l.eq_ignore_ascii_case(level))
}

/// Names used in labels, logs and Redis keys: short, no separators.
fn is_identifier(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

fn validate_providers(
    raw: Vec<Option<RawProvider>>,
    problems: &mut Vec<Problem>,
) -> (Vec<ProviderSettings>, HashMap<String, usize>) {
    let mut providers = Vec::new();
    let mut index = HashMap::new();
    for (i, raw) in raw.into_iter().enumerate() {
        let Some(raw) = raw else { continue };
        let path = format!("providers[{i}]");
        if !is_identifier(&raw.name) {
            problems.push(problem(
                &join(&path, "name"),
                "must be 1-64 characters of A-Z a-z 0-9 - _ .",
            ));
        }
        if index.contains_key(&raw.name) {
            problems.push(problem(
                &join(&path, "name"),
                format!("duplicate provider name '{}'", raw.name),
            ));
        }
        let kind = match raw.kind.as_str() {
            "openai" => Some(ProviderKind::OpenAi),
            "azure" => Some(ProviderKind::Azure),
            "anthropic" => Some(ProviderKind::Anthropic),
            other => {
                problems.push(problem(
                    &join(&path, "kind"),
                    format!("unknown kind '{other}'; supported: openai, azure, anthropic"),
                ));
                None
            }
        };
        match (kind, &raw.api_version) {
            (Some(ProviderKind::Azure), None) => problems.push(problem(
                &join(&path, "api_version"),
                "an azure provider needs api_version (for example \"2024-10-21\")",
            )),
            (Some(ProviderKind::OpenAi | ProviderKind::Anthropic), Some(_)) => {
                problems.push(problem(
                    &join(&path, "api_version"),
                    "only azure providers take api_version",
                ))
            }
            (_, Some(v))
                if v.is_empty() || !v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') =>
            {
                problems.push(problem(
                    &join(&path, "api_version"),
                    "must be letters, digits and '-'",
                ))
            }
            _ => {}
        }
        let base_url = BaseUrl::parse(&raw.base_url)
            .map_err(|e| problems.push(problem(&join(&path, "base_url"), e)))
            .ok();
        let weight = raw.weight.unwrap_or(1);
        if weight == 0 {
            problems.push(problem(&join(&path, "weight"), "must be at least 1"));
        }
        let api_key = raw.api_key.filter(|k| !k.is_empty()).map(Secret);
        let health_check = raw
            .health_check
            .map(|hc| validate_health_check(hc, &join(&path, "health_check"), problems));
        let timeouts = validate_timeouts(
            raw.timeouts.unwrap_or_default(),
            &join(&path, "timeouts"),
            problems,
        );
        if let (Some(kind), Some(base_url)) = (kind, base_url) {
            index.insert(raw.name.clone(), providers.len());
            providers.push(ProviderSettings {
                name: raw.name,
                kind,
                base_url,
                api_key,
                weight,
                api_version: raw.api_version,
                health_check,
                timeouts,
            });
        } else {
            // Keep the name known so models referring to it do not add a
            // second, misleading "unknown provider" problem.
            index.entry(raw.name).or_insert(usize::MAX);
        }
    }
    if providers.is_empty() && problems.is_empty() {
        problems.push(problem("providers", "at least one provider is required"));
    }
    (providers, index)
}

fn validate_models(
    raw: Vec<Option<RawModel>>,
    providers: &HashMap<String, usize>,
    problems: &mut Vec<Problem>,
) -> (Vec<ModelRoute>, HashMap<String, usize>) {
    let mut models = Vec::new();
    let mut index = HashMap::new();
    let mut fallback_names = Vec::new();
    for (i, raw) in raw.into_iter().enumerate() {
        let Some(raw) = raw else { continue };
        let path = format!("models[{i}]");
        if raw.name.trim().is_empty() || raw.name.len() > 256 {
            problems.push(problem(&join(&path, "name"), "must be 1-256 characters"));
        }
        if index.contains_key(&raw.name) {
            problems.push(problem(
                &join(&path, "name"),
                format!("duplicate model name '{}'", raw.name),
            ));
        }
        let strategy = match raw.strategy.as_deref().unwrap_or("round_robin") {
            "round_robin" => Strategy::RoundRobin,
            "weighted" => Strategy::Weighted,
            "least_latency" => Strategy::LeastLatency,
            "priority" => Strategy::Priority,
            "cheapest" => Strategy::Cheapest,
            other => {
                problems.push(problem(
                    &join(&path, "strategy"),
                    format!("unknown strategy '{other}'; supported: round_robin, weighted, least_latency, priority, cheapest"),
                ));
                Strategy::RoundRobin
            }
        };
        if raw.targets.is_empty() {
            problems.push(problem(
                &join(&path, "targets"),
                "at least one target is required",
            ));
        }
        let mut targets = Vec::new();
        for (t, target) in raw.targets.into_iter().enumerate() {
            let tpath = format!("{path}.targets[{t}]");
            match providers.get(&target.provider) {
                Some(&p) => targets.push(Target {
                    provider: p,
                    model: target.model.unwrap_or_else(|| raw.name.clone()),
                    price: None,
                }),
                None => problems.push(problem(
                    &join(&tpath, "provider"),
                    format!("unknown provider '{}'", target.provider),
                )),
            }
        }
        index.insert(raw.name.clone(), models.len());
        fallback_names.push((path, raw.fallbacks));
        models.push(ModelRoute {
            name: raw.name,
            strategy,
            targets,
            fallbacks: Vec::new(),
        });
    }
    // Fallbacks may name models defined later in the file.
    for (route, (path, names)) in models.iter_mut().zip(fallback_names) {
        for (f, name) in names.iter().enumerate() {
            match index.get(name) {
                Some(&i) if *name != route.name => route.fallbacks.push(i),
                Some(_) => problems.push(problem(
                    &format!("{path}.fallbacks[{f}]"),
                    "a model cannot fall back to itself",
                )),
                None => problems.push(problem(
                    &format!("{path}.fallbacks[{f}]"),
                    format!("unknown model '{name}'"),
                )),
            }
        }
    }
    if models.is_empty() && problems.is_empty() {
        problems.push(problem("models", "at least one model is required"));
    }
    (models, index)
}

fn validate_tenants(
    raw: Vec<Option<RawTenant>>,
    models: &HashMap<String, usize>,
    problems: &mut Vec<Problem>,
) -> (Vec<TenantSettings>, KeyIndex) {
    let mut tenants: Vec<TenantSettings> = Vec::new();
    let mut keys = KeyIndex::default();
    for (i, raw) in raw.into_iter().enumerate() {
        let Some(raw) = raw else { continue };
        let path = format!("tenants[{i}]");
        if !is_identifier(&raw.id) {
            problems.push(problem(
                &join(&path, "id"),
                "must be 1-64 characters of A-Z a-z 0-9 - _ .",
            ));
        }
        if tenants.iter().any(|t| t.id == raw.id) {
            problems.push(problem(
                &join(&path, "id"),
                format!("duplicate tenant id '{}'", raw.id),
            ));
        }
        if raw.keys.is_empty() {
            problems.push(problem(
                &join(&path, "keys"),
                "at least one key is required",
            ));
        }
        for (k, key) in raw.keys.iter().enumerate() {
            let kpath = format!("{path}.keys[{k}]");
            match parse_configured_key(key) {
                None => problems.push(problem(
                    &kpath,
                    "a 'sha256:' key must be followed by 64 hex digits",
                )),
                Some(_) if !key.starts_with("sha256:") && key.len() < 8 => problems.push(problem(
                    &kpath,
                    "a plaintext key must be at least 8 characters",
                )),
                Some(digest) => {
                    if let Some(other) = keys.insert(digest, tenants.len()) {
                        let owner = tenants
                            .get(other)
                            .map_or(raw.id.as_str(), |t| t.id.as_str());
                        problems.push(problem(
                            &kpath,
                            format!("the same key is already configured for tenant '{owner}'"),
                        ));
                    }
                }
            }
        }
        if let Some(allowed) = &raw.models {
            for (m, model) in allowed.iter().enumerate() {
                if !models.contains_key(model) {
                    problems.push(problem(
                        &format!("{path}.models[{m}]"),
                        format!("unknown model '{model}'"),
                    ));
                }
            }
        }
        let limits = raw
            .limits
            .map(|l| validate_limits(l, &format!("{path}.limits"), problems))
            .unwrap_or_default();
        let overflow = raw.overflow.map_or_else(TenantOverflow::default, |o| {
            let d = TenantOverflow::default();
            let max_wait = o.max_wait_seconds.unwrap_or(d.max_wait.as_secs());
            let max_parked = o.max_parked.unwrap_or(d.max_parked);
            if !(1..=3600).contains(&max_wait) {
                problems.push(problem(
                    &format!("{path}.overflow.max_wait_seconds"),
                    "must be between 1 and 3600",
                ));
            }
            if !(1..=1_000_000).contains(&max_parked) {
                problems.push(problem(
                    &format!("{path}.overflow.max_parked"),
                    "must be between 1 and 1000000",
                ));
            }
            let callbacks = o.callbacks.map(|c| {
                let mut allowed_urls = Vec::new();
                for (i, url) in c.allowed_urls.iter().enumerate() {
                    match CallbackUrl::parse(url) {
                        Ok(url) => allowed_urls.push(url),
                        Err(why) => problems.push(problem(
                            &format!("{path}.overflow.callbacks.allowed_urls[{i}]"),
                            format!("'{url}' is not a plain http(s) URL: {why}"),
                        )),
                    }
                }
                if c.secret.len() < 16 {
                    problems.push(problem(
                        &format!("{path}.overflow.callbacks.secret"),
                        "must be at least 16 characters",
                    ));
                }
                Callbacks {
                    allowed_urls,
                    secret: Secret(c.secret),
                }
            });
            TenantOverflow {
                enabled: o.enabled,
                max_wait: Duration::from_secs(max_wait),
                max_parked,
                callbacks,
            }
        });
        tenants.push(TenantSettings {
            id: raw.id,
            allowed_models: raw.models.map(|m| m.into_iter().collect()),
            limits,
            overflow,
        });
    }
    (tenants, keys)
}

fn validate_limits(raw: RawLimits, path: &str, problems: &mut Vec<Problem>) -> TenantLimits {
    let positive = |value: Option<u64>, key: &str, problems: &mut Vec<Problem>| {
        if value == Some(0) {
            problems.push(problem(
                &join(path, key),
                "must be at least 1 (leave it out for no limit)",
            ));
        }
    };
    positive(
        raw.requests_per_minute.map(u64::from),
        "requests_per_minute",
        problems,
    );
    positive(raw.tokens_per_minute, "tokens_per_minute", problems);
    positive(
        raw.max_concurrent.map(u64::from),
        "max_concurrent",
        problems,
    );
    let budget = raw.budget_usd.and_then(|b| {
        let bpath = join(path, "budget_usd");
        let period = match b.period.as_str() {
            "daily" => Some(BudgetPeriod::Daily),
            "monthly" => Some(BudgetPeriod::Monthly),
            "total" => Some(BudgetPeriod::Total),
            other => {
                problems.push(problem(
                    &join(&bpath, "period"),
                    format!("unknown period '{other}'; expected daily, monthly or total"),
                ));
                None
            }
        };
        if !(b.amount.is_finite() && b.amount > 0.0 && b.amount < 1e6) {
            problems.push(problem(
                &join(&bpath, "amount"),
                "must be a positive number of US dollars below 1,000,000",
            ));
            return None;
        }
        period.map(|period| Budget {
            amount_pusd: (b.amount * PICO_PER_USD).round() as i64,
            period,
        })
    });
    TenantLimits {
        requests_per_minute: raw.requests_per_minute,
        tokens_per_minute: raw.tokens_per_minute,
        max_concurrent: raw.max_concurrent,
        budget,
    }
}

fn validate_pricing(
    value: Value,
    models: &HashMap<String, usize>,
    providers: &[ProviderSettings],
    problems: &mut Vec<Problem>,
) -> HashMap<String, Price> {
    let mut pricing = HashMap::new();
    let Value::Mapping(map) = value else {
        if !value.is_null() {
            problems.push(problem(
                "pricing",
                "must be a mapping of model name to prices",
            ));
        }
        return pricing;
    };
    for (name, raw) in map {
        let name = name.as_str().unwrap_or("?").to_string();
        let path = format!("pricing.{name}");
        // A public model name, or `provider/model` for one target's price.
        let known = models.contains_key(&name)
            || name
                .split_once('/')
                .is_some_and(|(provider, _)| providers.iter().any(|p| p.name == provider));
        if !known {
            problems.push(problem(
                &path,
                format!("unknown model '{name}' (use a public model name or provider/model)"),
            ));
            continue;
        }
        let Some(raw) = deserialize::<RawPrice>(raw, &path, problems) else {
            continue;
        };
        // USD per 1M tokens -> pico-dollars per token.
        let mut per_token = |usd_per_million: f64, key: &str| {
            if !(usd_per_million.is_finite() && (0.0..100_000.0).contains(&usd_per_million)) {
                problems.push(problem(
                    &join(&path, key),
                    "must be a non-negative price in USD per 1M tokens",
                ));
                return 0;
            }
            (usd_per_million * 1e6).round() as i64
        };
        let price = Price {
            input: per_token(raw.input, "input"),
            output: per_token(raw.output, "output"),
            cached_input: per_token(raw.cached_input.unwrap_or(raw.input), "cached_input"),
        };
        pricing.insert(name, price);
    }
    pricing
}

fn validate_health_check(
    raw: RawHealthCheck,
    path: &str,
    problems: &mut Vec<Problem>,
) -> HealthCheckSettings {
    if !raw.path.starts_with('/') {
        problems.push(problem(
            &join(path, "path"),
            "must start with '/' (it is relative to base_url)",
        ));
    }
    let interval = raw.interval_seconds.unwrap_or(10);
    if !(1..=3600).contains(&interval) {
        problems.push(problem(
            &join(path, "interval_seconds"),
            "must be between 1 and 3600",
        ));
    }
    let timeout_ms = raw.timeout_ms.unwrap_or(2000);
    if !(1..=60_000).contains(&timeout_ms) {
        problems.push(problem(
            &join(path, "timeout_ms"),
            "must be between 1 and 60000",
        ));
    }
    let threshold =
        |value: Option<usize>, key: &str, default: usize, problems: &mut Vec<Problem>| {
            let n = value.unwrap_or(default);
            if !(1..=100).contains(&n) {
                problems.push(problem(&join(path, key), "must be between 1 and 100"));
            }
            n
        };
    HealthCheckSettings {
        path: raw.path,
        interval: Duration::from_secs(interval),
        healthy_threshold: threshold(raw.healthy_threshold, "healthy_threshold", 1, problems),
        unhealthy_threshold: threshold(raw.unhealthy_threshold, "unhealthy_threshold", 2, problems),
        timeout: Duration::from_millis(timeout_ms),
    }
}

fn validate_timeouts(raw: RawTimeouts, path: &str, problems: &mut Vec<Problem>) -> Timeouts {
    let defaults = Timeouts::default();
    let mut ms = |value: Option<u64>, key: &str, default: Duration| match value {
        Some(0) => {
            problems.push(problem(&join(path, key), "must be at least 1 ms"));
            default
        }
        Some(v) => Duration::from_millis(v),
        None => default,
    };
    Timeouts {
        connect: ms(raw.connect_ms, "connect_ms", defaults.connect),
        first_byte: ms(raw.first_byte_ms, "first_byte_ms", defaults.first_byte),
        idle: ms(raw.idle_ms, "idle_ms", defaults.idle),
        total: ms(raw.total_ms, "total_ms", defaults.total),
    }
}

fn validate_breaker(raw: RawBreaker, problems: &mut Vec<Problem>) -> BreakerSettings {
    let d = BreakerSettings::default();
    let mut positive = |value: Option<u64>, key: &str, default: u64| {
        let v = value.unwrap_or(default);
        if v == 0 {
            problems.push(problem(
                &format!("circuit_breaker.{key}"),
                "must be at least 1",
            ));
        }
        v
    };
    let settings = BreakerSettings {
        consecutive_failures: positive(
            raw.consecutive_failures.map(u64::from),
            "consecutive_failures",
            5,
        ) as u32,
        open: Duration::from_secs(positive(raw.open_seconds, "open_seconds", d.open.as_secs())),
        max_open: Duration::from_secs(positive(
            raw.max_open_seconds,
            "max_open_seconds",
            d.max_open.as_secs(),
        )),
        half_open_probes: positive(raw.half_open_probes.map(u64::from), "half_open_probes", 1)
            as u32,
        probe_timeout: Duration::from_secs(positive(
            raw.probe_timeout_seconds,
            "probe_timeout_seconds",
            d.probe_timeout.as_secs(),
        )),
        rate_limit_cooldown: Duration::from_secs(
            raw.rate_limit_cooldown_seconds
                .unwrap_or(d.rate_limit_cooldown.as_secs()),
        ),
    };
    if settings.max_open < settings.open {
        problems.push(problem(
            "circuit_breaker.max_open_seconds",
            "must not be less than open_seconds",
        ));
    }
    settings
}

fn validate_redis(raw: RawRedis, problems: &mut Vec<Problem>) -> Option<RedisSettings> {
    let before = problems.len();
    match url::Url::parse(&raw.url) {
        Ok(url) if matches!(url.scheme(), "redis" | "rediss") && url.host().is_some() => {}
        _ => problems.push(problem("redis.url", "must be a redis://host:port/db URL")),
    }
    let key_prefix = raw.key_prefix.unwrap_or_else(|| "runestone".into());
    if !is_identifier(&key_prefix) {
        problems.push(problem(
            "redis.key_prefix",
            "must be 1-64 characters of A-Z a-z 0-9 - _ .",
        ));
    }
    let timeout_ms = raw.timeout_ms.unwrap_or(50);
    if !(1..=10_000).contains(&timeout_ms) {
        problems.push(problem("redis.timeout_ms", "must be between 1 and 10000"));
    }
    (problems.len() == before).then(|| RedisSettings {
        url: Secret(raw.url),
        key_prefix,
        timeout: std::time::Duration::from_millis(timeout_ms),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = r#"
server:
  listen: "127.0.0.1:8080"
  metrics_listen: "127.0.0.1:9464"
providers:
  - name: openai
    base_url: "https://api.openai.com/v1"
    api_key: "${OPENAI_API_KEY}"
  - name: local
    base_url: "http://127.0.0.1:9000/v1/"
models:
  - name: gpt-4o-mini
    targets:
      - { provider: openai }
      - { provider: local, model: mock-small }
tenants:
  - id: acme
    keys: ["sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", "dev-key-acme"]
    models: ["gpt-4o-mini"]
"#;

    fn env(name: &str) -> Option<String> {
        (name == "OPENAI_API_KEY").then(|| "sk-provider".to_string())
    }

    fn problems(yaml: &str) -> Vec<String> {
        Config::from_yaml(yaml, env)
            .expect_err("expected problems")
            .into_iter()
            .map(|p| p.to_string())
            .collect()
    }

    #[test]
    fn loads_a_valid_config_with_defaults() {
        let config = Config::from_yaml(VALID, env).unwrap();
        assert_eq!(config.server.threads, 2);
        assert_eq!(
            config.server.max_request_body_bytes,
            DEFAULT_MAX_REQUEST_BODY_BYTES
        );
        assert_eq!(
            config.providers[0].api_key.as_ref().unwrap().expose(),
            "sk-provider"
        );
        assert_eq!(format!("{:?}", config.providers[0].api_key), "Some(*****)");
        assert_eq!(config.providers[1].base_url.path, "/v1");
        assert_eq!(config.providers[1].base_url.authority, "127.0.0.1:9000");
        let (_, route) = config.route("gpt-4o-mini").unwrap();
        assert_eq!(
            route.targets[0],
            Target {
                provider: 0,
                model: "gpt-4o-mini".into(),
                price: None,
            }
        );
        assert_eq!(
            route.targets[1],
            Target {
                provider: 1,
                model: "mock-small".into(),
                price: None,
            }
        );
        assert_eq!(
            config.keys.authenticate("test"),
            Some(0),
            "sha256 of 'test'"
        );
        assert_eq!(config.keys.authenticate("dev-key-acme"), Some(0));
        assert!(config.tenants[0].may_use("gpt-4o-mini"));
        assert!(!config.tenants[0].may_use("gpt-4o"));
    }

    #[test]
    fn reports_every_problem_with_its_key_path() {
        let yaml = r#"
server:
  listen: "nowhere"
  colour: blue
providers:
  - name: openai
    base_url: "ftp://example.com"
    api_key: "${MISSING_KEY}"
  - name: other
    base_url: "not a url"
    surprise: 1
models:
  - name: m
    targets: [{ provider: ghost }]
tenants:
  - id: acme
    keys: ["sha256:abc"]
    models: ["nope"]
  - id: acme
    keys: ["short"]
extra: true
"#;
        let found = problems(yaml);
        let expect = [
            "extra: unknown key",
            "server.colour: unknown field `colour`",
            "providers[0].api_key: environment variable MISSING_KEY is not set",
            "providers[0].base_url: scheme 'ftp'",
            "providers[1].surprise: unknown field `surprise`",
            "models[0].targets[0].provider: unknown provider 'ghost'",
            "tenants[0].keys[0]: a 'sha256:' key must be followed by 64 hex digits",
            "tenants[0].models[0]: unknown model 'nope'",
            "tenants[1].id: duplicate tenant id 'acme'",
            "tenants[1].keys[0]: a plaintext key must be at least 8 characters",
        ];
        for e in expect {
            assert!(
                found.iter().any(|f| f.starts_with(e)),
                "missing {e:?} in {found:#?}"
            );
        }
    }

    #[test]
    fn loads_limits_pricing_and_redis() {
        let yaml = VALID.replace(
            "    models: [\"gpt-4o-mini\"]\n",
            "    models: [\"gpt-4o-mini\"]\n    limits: { requests_per_minute: 60, tokens_per_minute: 1000, max_concurrent: 2, budget_usd: { amount: 1.5, period: daily } }\n",
        ) + "pricing:\n  gpt-4o-mini: { input: 0.15, output: 0.6, cached_input: 0.075 }\nredis: { url: \"redis://127.0.0.1:6379/0\" }\n";
        let config = Config::from_yaml(&yaml, env).unwrap();
        let limits = &config.tenants[0].limits;
        assert_eq!(limits.requests_per_minute, Some(60));
        assert_eq!(limits.tokens_per_minute, Some(1000));
        assert_eq!(limits.max_concurrent, Some(2));
        assert_eq!(
            limits.budget,
            Some(Budget {
                amount_pusd: 1_500_000_000_000,
                period: BudgetPeriod::Daily
            })
        );
        assert_eq!(
            config.pricing["gpt-4o-mini"],
            Price {
                input: 150_000,
                output: 600_000,
                cached_input: 75_000
            }
        );
        let redis = config.redis.clone().unwrap();
        assert_eq!(
            (redis.key_prefix.as_str(), redis.timeout.as_millis()),
            ("runestone", 50)
        );
        assert!(config.warnings().is_empty());
    }

    #[test]
    fn reports_bad_limits_pricing_and_redis() {
        let yaml = VALID.replace(
            "    models: [\"gpt-4o-mini\"]\n",
            "    limits: { requests_per_minute: 0, budget_usd: { amount: -1, period: weekly }, burst: 3 }\n",
        ) + "pricing:\n  gpt-5: { input: 1, output: 2 }\n  gpt-4o-mini: { input: -1, output: 2 }\nredis: { url: \"http://x\", timeout_ms: 0 }\n";
        let found = problems(&yaml);
        for e in [
            "tenants[0].limits.burst: unknown field `burst`",
            "pricing.gpt-5: unknown model 'gpt-5'",
            "pricing.gpt-4o-mini.input: must be a non-negative price",
            "redis.url: must be a redis://",
            "redis.timeout_ms: must be between 1 and 10000",
        ] {
            assert!(
                found.iter().any(|f| f.starts_with(e)),
                "missing {e:?} in {found:#?}"
            );
        }
        let yaml = VALID.replace(
            "    models: [\"gpt-4o-mini\"]\n",
            "    limits: { requests_per_minute: 0, budget_usd: { amount: -1, period: weekly } }\n",
        );
        let found = problems(&yaml);
        for e in [
            "tenants[0].limits.requests_per_minute: must be at least 1",
            "tenants[0].limits.budget_usd.period: unknown period 'weekly'",
            "tenants[0].limits.budget_usd.amount: must be a positive number",
        ] {
            assert!(
                found.iter().any(|f| f.starts_with(e)),
                "missing {e:?} in {found:#?}"
            );
        }
    }

    #[test]
    fn warns_about_models_without_a_price() {
        let config = Config::from_yaml(VALID, env).unwrap();
        assert_eq!(config.warnings().len(), 1);
        assert!(config.warnings()[0].contains("'gpt-4o-mini' has no price"));
    }

    #[test]
    fn reports_bad_listen_address_once_server_parses() {
        let yaml = VALID.replace("127.0.0.1:8080", "localhost");
        assert_eq!(
            problems(&yaml),
            ["server.listen: 'localhost' is not an IP:port address"]
        );
    }

    #[test]
    fn bounds_the_request_head_limit() {
        let config = Config::from_yaml(VALID, env).unwrap();
        assert_eq!(
            config.server.max_request_header_bytes,
            DEFAULT_MAX_REQUEST_HEADER_BYTES
        );
        for bad in ["100", "2000000"] {
            let yaml = VALID.replace(
                "  metrics_listen: \"127.0.0.1:9464\"\n",
                &format!(
                    "  metrics_listen: \"127.0.0.1:9464\"\n  max_request_header_bytes: {bad}\n"
                ),
            );
            assert_eq!(
                problems(&yaml),
                ["server.max_request_header_bytes: must be between 1024 and 1048576 (Pingora reads at most 1 MiB of headers)"]
            );
        }
    }

    #[test]
    fn rejects_a_key_shared_by_two_tenants() {
        let yaml = format!("{VALID}  - id: beta\n    keys: [\"dev-key-acme\"]\n");
        assert_eq!(
            problems(&yaml),
            ["tenants[1].keys[0]: the same key is already configured for tenant 'acme'"]
        );
    }

    #[test]
    fn parses_base_urls() {
        let url = BaseUrl::parse("https://api.openai.com/v1").unwrap();
        assert_eq!(
            (url.tls, url.port, url.path.as_str(), url.authority.as_str()),
            (true, 443, "/v1", "api.openai.com")
        );
        let url = BaseUrl::parse("http://[::1]:8000/").unwrap();
        assert_eq!(
            (
                url.host.as_str(),
                url.port,
                url.path.as_str(),
                url.authority.as_str()
            ),
            ("::1", 8000, "", "[::1]:8000")
        );
        assert!(BaseUrl::parse("https://user:pw@x.com/v1").is_err());
        assert!(BaseUrl::parse("https://x.com/v1?a=b").is_err());
    }

    #[test]
    fn rejects_yaml_that_is_not_a_mapping() {
        assert_eq!(problems("- 1"), ["the file must be a YAML mapping"]);
        assert!(problems("server: [")
            .iter()
            .all(|p| p.starts_with("not valid YAML")));
    }
}
