//! The Redis limit store: limits and spend shared by every gateway instance
//! that uses the same Redis.
//!
//! Keys of one tenant share a hash tag so Redis Cluster keeps them on one
//! slot: `{prefix}:{tenant}:rate` (hash: the two GCRA TATs),
//! `{prefix}:{tenant}:inflight` (sorted set: concurrency leases scored by
//! expiry), `{prefix}:{tenant}:usage:{period}` (hash: requests, tokens,
//! spend). An admission is one `EVALSHA` of [`ADMIT`] (the script is loaded
//! again on `NOSCRIPT`); a settlement one of [`SETTLE`]. Both use Redis's
//! clock, so instances with skewed clocks still agree.
//!
//! Every call is bounded by `redis.timeout_ms`. A failure marks the store
//! down (logged once, `runestone_redis_up 0`, `runestone_redis_errors_total`)
//! and the limiter falls back to in-process counters until
//! [`RedisMaintenance`] sees Redis answer again; spend recorded meanwhile is
//! kept here and flushed then. Leases held by this instance are renewed
//! while their requests run; those of a crashed instance expire after
//! [`LEASE_TTL_MS`].

use super::{PeriodUsage, RateLimitState, Refusal};
use crate::config::{RedisSettings, TenantLimits, TenantSettings};
use crate::metrics;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisResult, Script};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::{info, warn};

/// How long a concurrency lease lives without renewal.
pub const LEASE_TTL_MS: u64 = 30_000;

/// How often held leases are renewed.
const RENEW_EVERY: Duration = Duration::from_millis(LEASE_TTL_MS / 3);

/// How often a down Redis is probed, and pending spend flushed.
const PROBE_EVERY: Duration = Duration::from_millis(500);

/// All-or-nothing admission. Replies `{refused_limit_or_empty, now_ms,
/// requests_tat, tokens_tat, spent_pusd}`, numbers as strings (Lua's own
/// `tostring` keeps only 14 digits, too few for millisecond timestamps).
const ADMIT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local W, eps = 60000, 1e-6
local rpm, tpm, maxc, budget = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local tokens, lease, ttl = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
local rtat = tonumber(redis.call('HGET', KEYS[1], 'requests_tat') or '0')
local ttat = tonumber(redis.call('HGET', KEYS[1], 'tokens_tat') or '0')
local spent = tonumber(redis.call('HGET', KEYS[3], 'cost_pusd') or '0')
local function reply(refused)
  return {refused, string.format('%.6f', now), string.format('%.6f', rtat),
          string.format('%.6f', ttat), string.format('%d', spent)}
end
if budget > 0 and spent >= budget then return reply('budget') end
local new_r, new_t
if rpm > 0 then
  new_r = math.max(rtat, now) + W / rpm
  if new_r - now - W > eps then return reply('rpm') end
end
if tpm > 0 then
  new_t = math.max(ttat, now) + tokens * W / tpm
  if new_t - now - W > eps then return reply('tpm') end
end
if maxc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= maxc then return reply('concurrency') end
  redis.call('ZADD', KEYS[2], now + ttl, lease)
  redis.call('PEXPIRE', KEYS[2], ttl * 2)
end
if new_r then rtat = new_r; redis.call('HSET', KEYS[1], 'requests_tat', string.format('%.6f', rtat)) end
if new_t then ttat = new_t; redis.call('HSET', KEYS[1], 'tokens_tat', string.format('%.6f', ttat)) end
redis.call('PEXPIRE', KEYS[1], 2 * W)
return reply('')
";

/// Settlement: token correction, lease release, usage counters.
const SETTLE: &str = r"
local tpm, delta = tonumber(ARGV[1]), tonumber(ARGV[2])
if tpm > 0 and delta ~= 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
  local tat = tonumber(redis.call('HGET', KEYS[1], 'tokens_tat') or '0')
  local moved
  if delta > 0 then moved = math.max(tat, now) + delta * 60000 / tpm
  else moved = math.max(tat + delta * 60000 / tpm, now) end
  redis.call('HSET', KEYS[1], 'tokens_tat', string.format('%.6f', moved))
  redis.call('PEXPIRE', KEYS[1], 120000)
end
if ARGV[3] ~= '' then redis.call('ZREM', KEYS[2], ARGV[3]) end
redis.call('HINCRBY', KEYS[3], 'requests', ARGV[4])
redis.call('HINCRBY', KEYS[3], 'prompt_tokens', ARGV[5])
redis.call('HINCRBY', KEYS[3], 'completion_tokens', ARGV[6])
redis.call('HINCRBY', KEYS[3], 'cost_pusd', ARGV[7])
if tonumber(ARGV[8]) > 0 then redis.call('EXPIRE', KEYS[3], ARGV[8]) end
return 1
";

/// Renews this instance's leases of one tenant.
const RENEW: &str = r"
local t = redis.call('TIME')
local expiry = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000 + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) * 2)
return 1
";

/// Seconds a period's usage hash is kept after its last update.
fn usage_ttl_seconds(period_id: &str) -> u64 {
    match period_id.len() {
        10 => 3 * 86_400, // a day: 2026-11-25
        7 => 70 * 86_400, // a month: 2026-11
        _ => 0,           // total: kept
    }
}

struct Keys {
    rate: String,
    inflight: String,
    usage_prefix: String,
}

/// A Redis connection made on first use: the connection manager spawns its
/// driver on the runtime it is created in, which exists only once the
/// server runs. Shared by the limit store and the overflow queue.
pub(crate) struct LazyConnection {
    client: Option<redis::Client>,
    config: ConnectionManagerConfig,
    conn: std::sync::OnceLock<Option<ConnectionManager>>,
    /// What the connection is for, in warnings.
    purpose: &'static str,
}

impl LazyConnection {
    /// A connection to `settings.url`, every call bounded by its timeout.
    pub(crate) fn new(settings: &RedisSettings, purpose: &'static str) -> Self {
        let client = redis::Client::open(settings.url.expose())
            .map_err(|e| warn!(error = %e, "cannot set up the Redis client for {purpose}"))
            .ok();
        LazyConnection {
            client,
            config: ConnectionManagerConfig::new()
                .set_connection_timeout(Some(settings.timeout))
                .set_response_timeout(Some(settings.timeout))
                .set_number_of_retries(1),
            conn: std::sync::OnceLock::new(),
            purpose,
        }
    }

    /// Whether a client could be set up at all.
    pub(crate) fn is_configured(&self) -> bool {
        self.client.is_some()
    }

    /// The connection; must be called inside the Tokio runtime.
    pub(crate) fn get(&self) -> Option<ConnectionManager> {
        self.conn
            .get_or_init(|| {
                self.client
                    .as_ref()?
                    .get_connection_manager_lazy(self.config.clone())
                    .map_err(|e| warn!(error = %e, "cannot set up the Redis connection for {}", self.purpose))
                    .ok()
            })
            .clone()
    }
}

struct Inner {
    conn: LazyConnection,
    timeout: Duration,
    keys: Vec<Keys>,
    up: AtomicBool,
    admit: Script,
    settle: Script,
    renew: Script,
    /// Usage recorded while Redis was unavailable, per (tenant, period).
    pending: Mutex<HashMap<(usize, String), PeriodUsage>>,
    /// Spend last read from Redis, per tenant: (period, pUSD).
    known_spend: Vec<Mutex<(String, i64)>>,
    /// Leases this instance holds: lease id -> tenant.
    leases: Mutex<HashMap<String, usize>>,
    /// Leases whose release failed (Redis down or frozen at settlement):
    /// released by the flush once Redis answers, so a tenant does not lose
    /// those slots until the leases expire.
    unreleased: Mutex<Vec<(usize, String)>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("up", &self.up)
            .finish_non_exhaustive()
    }
}

/// Limits and spend in Redis, shared across instances.
#[derive(Debug, Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl RedisStore {
    /// A store for these tenants; connects lazily, on first use.
    pub fn new(settings: &RedisSettings, tenants: &[TenantSettings]) -> Self {
        let keys = tenants
            .iter()
            .map(|t| {
                let base = format!("{}:{{{}}}", settings.key_prefix, t.id);
                Keys {
                    rate: format!("{base}:rate"),
                    inflight: format!("{base}:inflight"),
                    usage_prefix: format!("{base}:usage:"),
                }
            })
            .collect();
        metrics::REDIS_UP.set(1);
        // Every operation's error count starts at 0, so rates work at once.
        for op in ["admit", "settle", "usage", "flush", "renew", "overflow"] {
            metrics::REDIS_ERRORS.with_label_values(&[op]);
        }
        RedisStore {
            inner: Arc::new(Inner {
                conn: LazyConnection::new(settings, "limits (they stay in-process)"),
                timeout: settings.timeout,
                keys,
                up: AtomicBool::new(true),
                admit: Script::new(ADMIT),
                settle: Script::new(SETTLE),
                renew: Script::new(RENEW),
                pending: Mutex::default(),
                known_spend: tenants.iter().map(|_| Mutex::default()).collect(),
                leases: Mutex::default(),
                unreleased: Mutex::default(),
            }),
        }
    }

    /// Whether Redis answered the last call.
    pub fn is_up(&self) -> bool {
        self.inner.up.load(Ordering::Relaxed) && self.inner.conn.is_configured()
    }

    /// The shared connection; must be called inside the Tokio runtime.
    fn connection(&self) -> Option<ConnectionManager> {
        self.inner.conn.get()
    }

    /// Runs one bounded Redis call; a failure marks the store down.
    async fn call<T, F, Fut>(&self, op: &'static str, f: F) -> Option<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let conn = self.connection()?;
        let error = match tokio::time::timeout(self.inner.timeout, f(conn)).await {
            Ok(Ok(value)) => return Some(value),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {:?}", self.inner.timeout),
        };
        metrics::REDIS_ERRORS.with_label_values(&[op]).inc();
        if self.inner.up.swap(false, Ordering::Relaxed) {
            metrics::REDIS_UP.set(0);
            warn!(op, error = %error, "Redis unavailable; limits fall back to in-process counters and spend is kept locally");
        }
        None
    }

    /// Admits in Redis. `None` when Redis cannot decide (the caller falls
    /// back to the in-process store).
    pub async fn admit(
        &self,
        tenant: usize,
        limits: &TenantLimits,
        tokens: u64,
        lease: &str,
        period_id: &str,
    ) -> Option<Result<RateLimitState, Refusal>> {
        if !self.is_up() {
            return None;
        }
        let keys = &self.inner.keys[tenant];
        let usage_key = format!("{}{period_id}", keys.usage_prefix);
        let reply: Option<(String, String, String, String, String)> = self
            .call("admit", |mut conn| async move {
                self.inner
                    .admit
                    .key(&keys.rate)
                    .key(&keys.inflight)
                    .key(&usage_key)
                    .arg(limits.requests_per_minute.unwrap_or(0))
                    .arg(limits.tokens_per_minute.unwrap_or(0))
                    .arg(limits.max_concurrent.unwrap_or(0))
                    .arg(limits.budget.map_or(0, |b| b.amount_pusd))
                    .arg(tokens)
                    .arg(lease)
                    .arg(LEASE_TTL_MS)
                    .invoke_async(&mut conn)
                    .await
            })
            .await;
        let Some((refused, now, requests_tat, tokens_tat, spent)) = reply else {
            // A call that timed out may still run once Redis answers again
            // (a frozen Redis reads it later) and take a slot nobody holds:
            // release it with the flush.
            if limits.max_concurrent.is_some() {
                lock(&self.inner.unreleased).push((tenant, lease.to_string()));
            }
            return None;
        };
        let number = |s: &str| s.parse::<f64>().unwrap_or(0.0);
        let (now, requests_tat, tokens_tat) =
            (number(&now), number(&requests_tat), number(&tokens_tat));
        *lock(&self.inner.known_spend[tenant]) =
            (period_id.to_string(), spent.parse().unwrap_or(0));
        let state = RateLimitState {
            requests: limits
                .requests_per_minute
                .map(|rpm| super::window(requests_tat, now, u64::from(rpm))),
            tokens: limits
                .tokens_per_minute
                .map(|tpm| super::window(tokens_tat, now, tpm)),
        };
        if refused.is_empty() {
            if limits.max_concurrent.is_some() {
                lock(&self.inner.leases).insert(lease.to_string(), tenant);
            }
            return Some(Ok(state));
        }
        let limit = super::LimitKind::from_label(&refused)?;
        let retry_after_ms = match limit {
            super::LimitKind::Requests => limits
                .requests_per_minute
                .and_then(|rpm| super::gcra_take(requests_tat, now, f64::from(rpm), 1.0).err()),
            super::LimitKind::Tokens => limits
                .tokens_per_minute
                .and_then(|tpm| super::gcra_take(tokens_tat, now, tpm as f64, tokens as f64).err()),
            _ => None,
        };
        Some(Err(Refusal {
            limit,
            retry_after_ms: retry_after_ms.map(|ms| ms.ceil() as u64),
            state,
        }))
    }

    /// Settles in Redis: token correction, lease release, usage counters.
    /// When Redis is unavailable the usage is kept for a later flush.
    pub async fn settle(
        &self,
        tenant: usize,
        limits: &TenantLimits,
        token_delta: i64,
        lease: Option<&str>,
        period_id: &str,
        usage: &PeriodUsage,
    ) {
        if let Some(lease) = lease {
            lock(&self.inner.leases).remove(lease);
        }
        if self.is_up() {
            let keys = &self.inner.keys[tenant];
            let usage_key = format!("{}{period_id}", keys.usage_prefix);
            let done: Option<i64> = self
                .call("settle", |mut conn| async move {
                    self.inner
                        .settle
                        .key(&keys.rate)
                        .key(&keys.inflight)
                        .key(&usage_key)
                        .arg(limits.tokens_per_minute.unwrap_or(0))
                        .arg(token_delta)
                        .arg(lease.unwrap_or(""))
                        .arg(usage.requests)
                        .arg(usage.prompt_tokens)
                        .arg(usage.completion_tokens)
                        .arg(usage.cost_pusd)
                        .arg(usage_ttl_seconds(period_id))
                        .invoke_async(&mut conn)
                        .await
                })
                .await;
            if done.is_some() {
                return;
            }
        }
        if let Some(lease) = lease.filter(|l| !l.is_empty()) {
            lock(&self.inner.unreleased).push((tenant, lease.to_string()));
        }
        lock(&self.inner.pending)
            .entry((tenant, period_id.to_string()))
            .or_default()
            .add(usage);
    }

    /// The last spend read from Redis plus what is pending here: the budget
    /// check's view while Redis is unavailable.
    pub fn known_spend(&self, tenant: usize, period_id: &str) -> i64 {
        let known = {
            let known = lock(&self.inner.known_spend[tenant]);
            if known.0 == period_id {
                known.1
            } else {
                0
            }
        };
        let pending = lock(&self.inner.pending)
            .get(&(tenant, period_id.to_string()))
            .map_or(0, |u| u.cost_pusd);
        known + pending
    }

    /// The period's usage: Redis's counters plus what is pending here.
    /// The flag says Redis could not be read.
    pub async fn usage(&self, tenant: usize, period_id: &str) -> (PeriodUsage, bool) {
        let mut usage = lock(&self.inner.pending)
            .get(&(tenant, period_id.to_string()))
            .cloned()
            .unwrap_or_default();
        if !self.is_up() {
            return (usage, true);
        }
        let key = format!("{}{period_id}", self.inner.keys[tenant].usage_prefix);
        type Counters = (Option<u64>, Option<u64>, Option<u64>, Option<i64>);
        let read: Option<Counters> = self
            .call("usage", |mut conn| async move {
                redis::cmd("HMGET")
                    .arg(&key)
                    .arg(&[
                        "requests",
                        "prompt_tokens",
                        "completion_tokens",
                        "cost_pusd",
                    ])
                    .query_async(&mut conn)
                    .await
            })
            .await;
        match read {
            Some((requests, prompt, completion, cost)) => {
                usage.add(&PeriodUsage {
                    requests: requests.unwrap_or(0),
                    prompt_tokens: prompt.unwrap_or(0),
                    completion_tokens: completion.unwrap_or(0),
                    cost_pusd: cost.unwrap_or(0),
                });
                (usage, false)
            }
            None => (usage, true),
        }
    }

    /// Probes a down Redis; marks it up when it answers.
    async fn probe(&self) {
        let Some(mut conn) = self.connection() else {
            return;
        };
        let ping = tokio::time::timeout(
            self.inner.timeout,
            redis::cmd("PING").query_async::<String>(&mut conn),
        )
        .await;
        if matches!(ping, Ok(Ok(_))) && !self.inner.up.swap(true, Ordering::Relaxed) {
            metrics::REDIS_UP.set(1);
            // Every operation's error count starts at 0, so rates work at once.
            for op in ["admit", "settle", "usage", "flush", "renew", "overflow"] {
                metrics::REDIS_ERRORS.with_label_values(&[op]);
            }
            info!("Redis is back; limits are shared again");
        }
    }

    /// Writes usage recorded while Redis was down, and releases the leases
    /// that could not be released then.
    async fn flush_pending(&self) {
        let pending: Vec<((usize, String), PeriodUsage)> =
            lock(&self.inner.pending).drain().collect();
        let unreleased: Vec<(usize, String)> = lock(&self.inner.unreleased).drain(..).collect();
        if pending.is_empty() && unreleased.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        for (tenant, lease) in &unreleased {
            pipe.zrem(&self.inner.keys[*tenant].inflight, lease)
                .ignore();
        }
        for ((tenant, period_id), usage) in &pending {
            let key = format!("{}{period_id}", self.inner.keys[*tenant].usage_prefix);
            pipe.hincr(&key, "requests", usage.requests).ignore();
            pipe.hincr(&key, "prompt_tokens", usage.prompt_tokens)
                .ignore();
            pipe.hincr(&key, "completion_tokens", usage.completion_tokens)
                .ignore();
            pipe.hincr(&key, "cost_pusd", usage.cost_pusd).ignore();
            let ttl = usage_ttl_seconds(period_id);
            if ttl > 0 {
                pipe.expire(&key, ttl as i64).ignore();
            }
        }
        let pipe = &pipe;
        let written: Option<()> = self
            .call("flush", |mut conn| async move {
                pipe.query_async(&mut conn).await
            })
            .await;
        if written.is_none() {
            let mut back = lock(&self.inner.pending);
            for (key, usage) in pending {
                back.entry(key).or_default().add(&usage);
            }
            lock(&self.inner.unreleased).extend(unreleased);
        } else {
            info!(
                entries = pending.len(),
                leases = unreleased.len(),
                "flushed usage and lease releases recorded while Redis was unavailable"
            );
        }
    }

    /// Extends the leases this instance holds.
    async fn renew_leases(&self) {
        let mut by_tenant: HashMap<usize, Vec<String>> = HashMap::new();
        for (lease, tenant) in lock(&self.inner.leases).iter() {
            by_tenant.entry(*tenant).or_default().push(lease.clone());
        }
        for (tenant, leases) in by_tenant {
            let key = &self.inner.keys[tenant].inflight;
            let leases = &leases;
            let _: Option<i64> = self
                .call("renew", |mut conn| async move {
                    let mut invocation = self.inner.renew.key(key);
                    invocation.arg(LEASE_TTL_MS);
                    for lease in leases {
                        invocation.arg(lease);
                    }
                    invocation.invoke_async(&mut conn).await
                })
                .await;
        }
    }
}

/// Background service: probes Redis while it is down, flushes spend kept
/// meanwhile, renews this instance's leases.
pub struct RedisMaintenance {
    store: RedisStore,
}

impl RedisMaintenance {
    /// Maintenance for `store`.
    pub fn new(store: RedisStore) -> Self {
        RedisMaintenance { store }
    }
}

#[async_trait]
impl BackgroundService for RedisMaintenance {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut probe = tokio::time::interval(PROBE_EVERY);
        let mut renew = tokio::time::interval(RENEW_EVERY);
        loop {
            tokio::select! {
                _ = probe.tick() => {
                    if !self.store.is_up() {
                        self.store.probe().await;
                    }
                    if self.store.is_up() {
                        self.store.flush_pending().await;
                    }
                }
                _ = renew.tick() => {
                    if self.store.is_up() {
                        self.store.renew_leases().await;
                    }
                }
                _ = shutdown.changed() => {
                    if self.store.is_up() {
                        self.store.flush_pending().await;
                    }
                    return;
                }
            }
        }
    }
}
