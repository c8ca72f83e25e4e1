//! The validated model the gateway runs on: every type here is built by
//! validation and cannot hold an invalid value.

use super::keys::KeyDigest;
use super::{Callbacks, Secret};
use crate::cost::ServiceTier;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

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
    /// How long a client may leave a write of its answer untaken (up to
    /// [`crate::gateway::client::SEND_PIECE`] bytes at a time) before its
    /// connection is cut.
    pub client_send_timeout: Duration,
    /// How long a client's kept-alive connection waits for its next
    /// request before it is closed.
    pub client_idle_timeout: Duration,
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
    /// The header those proxies name the client in.
    pub client_address_header: ForwardedHeader,
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

/// Default for `server.client_send_timeout_seconds`: nginx's `send_timeout`.
pub const DEFAULT_CLIENT_SEND_TIMEOUT_SECONDS: u64 = 60;

/// Default for `server.client_idle_timeout_seconds`: longer than the load
/// balancers before a gateway keep idle connections to it (AWS's 60 s by
/// default, Google Cloud's 600 s), and than the OpenAI SDKs keep theirs,
/// so the client side closes first and never sends into a connection the
/// gateway is closing.
pub const DEFAULT_CLIENT_IDLE_TIMEOUT_SECONDS: u64 = 620;

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
    /// `authority` as a header value, made once.
    pub host_header: http::HeaderValue,
}

impl BaseUrl {
    /// Parses and checks an `http(s)://host[:port]/path` URL.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let url = url::Url::parse(raw).map_err(|e| format!("'{raw}' is not a valid URL: {e}"))?;
        // The URL standard reads `http:///v1` as the host `v1` (and
        // `http:/h` or `http:\\h` as `h`): a typo, not a provider.
        let after_scheme = raw.trim().split_once(':').map_or("", |(_, rest)| rest);
        let authority = after_scheme.strip_prefix("//").unwrap_or("/");
        if authority.starts_with(['/', '\\']) {
            return Err(format!("'{raw}' has no host after '//'"));
        }
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
        if port == 0 {
            return Err(format!(
                "'{raw}' has port 0, which nothing can be reached on"
            ));
        }
        let authority = match (url.port(), url.host()) {
            (Some(p), Some(url::Host::Ipv6(ip))) => format!("[{ip}]:{p}"),
            (None, Some(url::Host::Ipv6(ip))) => format!("[{ip}]"),
            (Some(p), _) => format!("{host}:{p}"),
            (None, _) => host.clone(),
        };
        let host_header = http::HeaderValue::from_str(&authority)
            .map_err(|_| format!("'{raw}' has a host that cannot be sent in a Host header"))?;
        Ok(BaseUrl {
            tls,
            host,
            port,
            path: url.path().trim_end_matches('/').to_string(),
            authority,
            host_header,
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
    /// The header that carries `api_key` as its API wants it (marked
    /// sensitive: never logged by the HTTP stack), made once at load.
    pub credential: Option<(http::HeaderName, http::HeaderValue)>,
    /// `api_key` made ready, once at load, to be kept out of what goes to
    /// clients (none for a placeholder key, see
    /// [`crate::redact::MIN_REDACTED_KEY_LEN`]).
    pub redact_key: Option<crate::redact::RedactKey>,
    /// Relative share for weighted routing.
    pub weight: u32,
    /// Azure's `api-version` query parameter.
    pub api_version: Option<String>,
    /// Active health check, when configured.
    pub health_check: Option<HealthCheckSettings>,
    /// Timeouts for every request to it.
    pub timeouts: Timeouts,
    /// It continues an assistant message left last in the conversation (a
    /// prefill), so a broken stream can be resumed on it.
    pub supports_prefill: bool,
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
    /// From the request sent to the first content (a stream's first
    /// content event, a JSON answer's whole body): the response head is
    /// held until then, so a provider too slow to start fails over.
    pub first_token: Duration,
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
            first_token: Duration::from_secs(60),
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
            open: Duration::from_secs(10),
            max_open: Duration::from_secs(30),
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
    /// Index into [`Config::providers`](super::Config::providers).
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
    /// Other public models (indices into [`Config::models`](super::Config::models)) to try, in
    /// order, when no target can serve.
    pub fallbacks: Vec<usize>,
    /// Models (indices) with a larger context window, tried in order when a
    /// provider says the prompt does not fit.
    pub context_fallbacks: Vec<usize>,
    /// A stream its provider breaks off after content reached the client is
    /// continued on the next eligible target.
    pub resume_streams: bool,
    /// Its answers' caching (with a `cache:` section).
    pub cache: super::ModelCache,
}

/// The failover policy (`failover:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailoverSettings {
    /// Attempts per request, across deployments, retries and fallbacks.
    pub max_attempts: usize,
    /// The longest a request waits, in all, for a rate-limited (or briefly
    /// open) deployment when nothing else can serve.
    pub max_retry_wait: Duration,
    /// Extra attempts on the same deployment after a transient failure (a
    /// 500, 502 or 503, or a reset before any byte).
    pub same_deployment_retries: u32,
    /// The pause before such a retry (jittered by half either way).
    pub same_deployment_delay: Duration,
}

impl Default for FailoverSettings {
    fn default() -> Self {
        FailoverSettings {
            max_attempts: 3,
            max_retry_wait: Duration::from_secs(2),
            same_deployment_retries: 1,
            same_deployment_delay: Duration::from_millis(100),
        }
    }
}

/// A validated tenant.
#[derive(Debug, Clone)]
pub struct TenantSettings {
    /// Unique id, used in metric labels and logs.
    pub id: String,
    /// Digests of its keys (plaintext keys are digested at load).
    pub keys: Vec<KeyDigest>,
    /// The public models it may use; `None` means all.
    pub allowed_models: Option<HashSet<String>>,
    /// Its admission limits; all `None` means unlimited.
    pub limits: TenantLimits,
    /// Whether and how requests over its limits wait instead of failing.
    pub overflow: TenantOverflow,
    /// Whether its answers are cached (with a `cache:` section).
    pub cache: bool,
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
    /// The tenant's share of the drain: its queue heads are served in
    /// proportion to the weights of the tenants waiting.
    pub weight: u32,
    /// Where async job results may be POSTed, and the signing secret.
    pub callbacks: Option<Callbacks>,
}

impl Default for TenantOverflow {
    fn default() -> Self {
        TenantOverflow {
            enabled: false,
            max_wait: Duration::from_secs(30),
            max_parked: 1000,
            weight: 1,
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
    /// How long a submission's `Idempotency-Key` finds its job again.
    pub idempotency_window: Duration,
    /// Attempts a job gets when its runs fail in a way worth retrying.
    pub max_attempts: u32,
    /// No attempt starts later than this after submission.
    pub max_age: Duration,
    /// The longest one attempt may run.
    pub timeout: Duration,
    /// The delay before the second attempt; it doubles for each further
    /// one (with jitter), up to `retry_backoff_max`.
    pub retry_backoff: Duration,
    /// The longest delay between attempts.
    pub retry_backoff_max: Duration,
    /// Jobs this instance runs at once (the capacity the tenants' weights
    /// share).
    pub concurrency: usize,
}

impl Default for JobSettings {
    fn default() -> Self {
        JobSettings {
            result_ttl: Duration::from_secs(86_400),
            visibility_timeout: Duration::from_secs(60),
            in_process_max_jobs: 10_000,
            in_process_max_bytes: 256 * 1024 * 1024,
            idempotency_window: Duration::from_secs(86_400),
            max_attempts: 5,
            max_age: Duration::from_secs(86_400),
            timeout: Duration::from_secs(600),
            retry_backoff: Duration::from_secs(1),
            retry_backoff_max: Duration::from_secs(60),
            concurrency: 64,
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

/// Prices of one public model, in pico-dollars per token (or per request,
/// image, second of audio or character).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Price {
    /// Per prompt token not served from the provider's cache.
    pub input: i64,
    /// Per completion token.
    pub output: i64,
    /// Per cached prompt token (defaults to the input price).
    pub cached_input: i64,
    /// Per request answered (moderations, images, audio).
    pub request: i64,
    /// Per image generated or edited.
    pub image: i64,
    /// Per second of audio transcribed or translated.
    pub audio_second: i64,
    /// Per character of text spoken (`/v1/audio/speech`).
    pub character: i64,
    /// Token prices of the processing tiers priced apart from the standard
    /// one (`service_tiers`), in [`ServiceTier::PRICED`]'s order.
    pub tiers: [Option<TokenPrice>; 3],
}

/// The token prices of one processing tier, in pico-dollars per token.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenPrice {
    /// Per prompt token not served from the provider's cache.
    pub input: i64,
    /// Per completion token.
    pub output: i64,
    /// Per cached prompt token.
    pub cached_input: i64,
}

impl Price {
    /// Whether some processing tier has a price of its own.
    pub fn tiered(&self) -> bool {
        self.tiers.iter().any(Option::is_some)
    }

    /// The price of tokens served at `tier`: its own when it has one,
    /// else the standard one.
    pub fn tokens_at(&self, tier: Option<ServiceTier>) -> TokenPrice {
        tier.and_then(|tier| self.tier(tier)).unwrap_or(TokenPrice {
            input: self.input,
            output: self.output,
            cached_input: self.cached_input,
        })
    }

    /// Whether tokens cost less at `tier` than at the standard price (any
    /// of its three prices lower).
    pub fn cheaper_at(&self, tier: ServiceTier) -> bool {
        self.tier(tier).is_some_and(|t| {
            t.input < self.input || t.output < self.output || t.cached_input < self.cached_input
        })
    }

    /// `tier`'s own token price, if it has one (never the standard tier's).
    pub fn tier(&self, tier: ServiceTier) -> Option<TokenPrice> {
        let at = ServiceTier::PRICED.iter().position(|t| *t == tier)?;
        self.tiers[at]
    }
}

/// Shared state in Redis.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// Which Redis: one server, a cluster, or a Sentinel-watched primary.
    pub target: RedisTarget,
    /// TLS material beyond the system roots, for `rediss://` endpoints.
    pub tls: RedisTls,
    /// ACL user and password for the data nodes (`url` or `cluster_nodes`),
    /// instead of the URL's own (a password needs no URL escaping here).
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// Prefix of every key (`runestone:{tenant}:...`).
    pub key_prefix: String,
    /// Bound on every Redis call.
    pub timeout: std::time::Duration,
    /// Quota each instance takes ahead from Redis and admits against
    /// without a round trip (`redis.lease`); `None`: every admission is
    /// decided in Redis.
    pub lease: Option<LeaseSettings>,
}

/// `redis.lease`: how much of each tenant's limits one instance may take
/// from Redis ahead of its requests, and how long it keeps what it does
/// not use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LeaseSettings {
    /// The share (0 to 0.5] of each of the tenant's requests and tokens
    /// per minute and of its `max_concurrent` an instance takes at a time.
    pub share: f64,
    /// How long an instance keeps quota it has not used before giving it
    /// back.
    pub hold: std::time::Duration,
}

/// Where Redis is. URLs may hold credentials: they are [`Secret`]s, never
/// logged ([`RedisTarget::endpoints`] is what may be).
#[derive(Debug, Clone)]
pub enum RedisTarget {
    /// One server: `redis.url`.
    Single {
        /// `redis://` or `rediss://` (user, password, db allowed).
        url: Secret,
    },
    /// Redis Cluster: `redis.cluster_nodes`, the seed nodes.
    Cluster {
        /// Seed node URLs (credentials from the first).
        nodes: Vec<Secret>,
    },
    /// A primary found through Sentinel: `redis.sentinel`.
    Sentinel {
        /// The monitored primary's name.
        master_name: String,
        /// Sentinel URLs.
        nodes: Vec<Secret>,
        /// ACL user and password for the sentinels.
        username: Option<String>,
        password: Option<Secret>,
        /// ACL user and password for the primary.
        master_username: Option<String>,
        master_password: Option<Secret>,
        /// Database on the primary.
        db: i64,
    },
}

impl RedisTarget {
    /// The mode's name, for the start-up log.
    pub fn mode(&self) -> &'static str {
        match self {
            RedisTarget::Single { .. } => "single",
            RedisTarget::Cluster { .. } => "cluster",
            RedisTarget::Sentinel { .. } => "sentinel",
        }
    }

    /// The endpoints as `scheme://host:port`, without credentials: what
    /// the start-up log may print.
    pub fn endpoints(&self) -> Vec<String> {
        let urls: Vec<&Secret> = match self {
            RedisTarget::Single { url } => vec![url],
            RedisTarget::Cluster { nodes } | RedisTarget::Sentinel { nodes, .. } => {
                nodes.iter().collect()
            }
        };
        urls.iter()
            .filter_map(|url| {
                let url = url::Url::parse(url.expose()).ok()?;
                Some(format!(
                    "{}://{}:{}",
                    url.scheme(),
                    url.host_str()?,
                    url.port().unwrap_or(6379)
                ))
            })
            .collect()
    }

    /// Whether the connections to Redis use TLS (`rediss://`).
    pub fn uses_tls(&self) -> bool {
        self.endpoints().iter().any(|e| e.starts_with("rediss://"))
    }
}

/// PEM material for TLS to Redis, read when the config is loaded.
#[derive(Clone, Default)]
pub struct RedisTls {
    /// A CA to trust instead of the system roots (`redis.ca_file`).
    pub ca: Option<Vec<u8>>,
    /// A client certificate and its key, for mutual TLS.
    pub client: Option<(Vec<u8>, Secret)>,
}

impl std::fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTls")
            .field("ca", &self.ca.is_some())
            .field("client", &self.client.is_some())
            .finish()
    }
}

impl TenantSettings {
    /// Whether this tenant may use `model`.
    pub fn may_use(&self, model: &str) -> bool {
        self.allowed_models
            .as_ref()
            .is_none_or(|allowed| allowed.contains(model))
    }
}

/// Which header a trusted proxy names the client in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1, ...` (the default).
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=client, for=proxy1`.
    Forwarded,
}

impl ForwardedHeader {
    /// The header's name.
    pub fn name(self) -> &'static str {
        match self {
            ForwardedHeader::XForwardedFor => "x-forwarded-for",
            ForwardedHeader::Forwarded => "forwarded",
        }
    }
}
