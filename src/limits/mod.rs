//! Tenant admission: requests and tokens per minute, concurrency, budgets.
//!
//! # Algorithm
//!
//! Requests and tokens per minute use GCRA (the generic cell rate
//! algorithm) over a one-minute window: a limit of N per minute admits up to
//! N at once from idle (the burst is the whole minute) and then refills
//! continuously at N/60 per second. State is one number per limit, the
//! theoretical arrival time (TAT); a request of weight `w` is admitted when
//! `max(TAT, now) + w * 60s/N - now <= 60s`. So a burst of N + k requests
//! against an idle limit of N admits exactly N, and the refusal says exactly
//! when the next one fits (`retry-after-ms`).
//!
//! Tokens are reserved at admission from an estimate (see
//! [`crate::cost::estimate_request_tokens`]; a single request is reserved at
//! most the whole minute's tokens, so it can always eventually run) and
//! settled when the response ends: the difference to the real usage moves
//! the TAT back (refund) or forward (overrun).
//!
//! Concurrency is a count of in-flight slots, released when the request ends
//! however it ends. Budgets compare the period's spend with the cap; the
//! request that crosses the cap is served, the ones after it are refused.
//!
//! # Stores
//!
//! Without `redis:` all state is in this process ([`local::LocalStore`],
//! one small mutex per tenant). With `redis:` it is global across instances
//! ([`redis::RedisStore`]: Lua scripts, admissions and settlements that wait
//! together sent in one round trip, slots as expiring leases); when Redis
//! fails or is slow the limiter falls back to the in-process store, counts
//! the error, and keeps the spend locally until it can be flushed. With
//! `redis.lease` each instance takes a share of every limit ahead and
//! admits against it without a round trip, owing its usage to the flush
//! (the store's `pool` module).

pub(crate) mod beside;
pub mod local;
mod period;
pub mod redis;
mod tail;

use crate::config::{BudgetPeriod, Config, TenantLimits};
use crate::cost::Usage;
use crate::gcra;
use crate::metrics;
use crate::redis_conn::RedisConnection;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use crate::gcra::WINDOW_MS;

/// The most tokens one admission reserves, whatever it asks for.
const MAX_RESERVED_TOKENS: u64 = 1 << 32;

/// A token count as a signed number, saturating (usage comes from
/// providers, reservations from stored jobs: neither may overflow).
fn signed(tokens: u64) -> i64 {
    i64::try_from(tokens).unwrap_or(i64::MAX)
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    /// `requests_per_minute`
    Requests,
    /// `tokens_per_minute`
    Tokens,
    /// `max_concurrent`
    Concurrency,
    /// `budget_usd`
    Budget,
}

impl LimitKind {
    /// The `runestone_rate_limited_total{limit}` label.
    pub fn label(self) -> &'static str {
        match self {
            LimitKind::Requests => "rpm",
            LimitKind::Tokens => "tpm",
            LimitKind::Concurrency => "concurrency",
            LimitKind::Budget => "budget",
        }
    }

    /// The limit a `runestone_rate_limited_total{limit}` label names.
    pub fn from_label(label: &str) -> Option<Self> {
        match label {
            "rpm" => Some(LimitKind::Requests),
            "tpm" => Some(LimitKind::Tokens),
            "concurrency" => Some(LimitKind::Concurrency),
            "budget" => Some(LimitKind::Budget),
            _ => None,
        }
    }
}

/// One per-minute limit as OpenAI's `x-ratelimit-*` headers describe it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// The limit per minute.
    pub limit: u64,
    /// What could still be admitted now.
    pub remaining: u64,
    /// Milliseconds until the limit is whole again.
    pub reset_ms: u64,
}

/// The tenant's per-minute limits after an admission decision.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimitState {
    /// `x-ratelimit-*-requests`, when the tenant has an RPM limit.
    pub requests: Option<Window>,
    /// `x-ratelimit-*-tokens`, when the tenant has a TPM limit.
    pub tokens: Option<Window>,
}

/// A refused admission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The limit that refused.
    pub limit: LimitKind,
    /// When a retry can succeed; `None` when no wait will help (a `total`
    /// budget that is spent).
    pub retry_after_ms: Option<u64>,
    /// The limits' state, for the response headers.
    pub state: RateLimitState,
}

/// The header view of a per-minute limit with TAT `tat`.
pub fn window(tat: f64, now: f64, limit: u64) -> Window {
    let (remaining, reset_ms) = gcra::remaining(tat, now, limit);
    Window {
        limit,
        remaining,
        reset_ms,
    }
}

/// Milliseconds since the Unix epoch, as a float (Redis uses its own clock).
pub fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

pub use period::{accounting_period, period_at};
pub use tail::AWAITED_ENV;

/// The environment variable a reload hands the new process the spend in
/// ([`Limiter::handover`]).
pub const HANDOVER_ENV: &str = "RUNESTONE_HANDED_OVER_SPEND";

/// The environment variable a reload hands the new process each tenant's
/// usage in, without Redis ([`Limiter::handover_usage`]).
pub const HANDOVER_USAGE_ENV: &str = "RUNESTONE_HANDED_OVER_USAGE";

/// The environment variable a reload hands the new process each tenant's
/// requests and tokens minutes in, without Redis
/// ([`Limiter::handover_minutes`]).
pub const HANDOVER_MINUTES_ENV: &str = "RUNESTONE_HANDED_OVER_MINUTES";

/// The most [`Limiter::handover`] writes: within Linux's bound on one
/// environment string (128 KiB), or the new process could not start.
pub const HANDOVER_BYTES: usize = 96 * 1024;

/// `entries` (JSON texts, the most wanted first) as one JSON array of at
/// most [`HANDOVER_BYTES`]: the text, and how many of them fit.
fn handover_text<'a>(entries: impl IntoIterator<Item = &'a str>) -> (String, usize) {
    let mut text = String::from("[");
    let mut fitted = 0;
    for entry in entries {
        if text.len() + entry.len() + 2 > HANDOVER_BYTES {
            break;
        }
        if text.len() > 1 {
            text.push(',');
        }
        text.push_str(entry);
        fitted += 1;
    }
    text.push(']');
    (text, fitted)
}

/// Counters of one tenant in one period.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeriodUsage {
    /// Requests settled.
    pub requests: u64,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Spend in pico-dollars.
    pub cost_pusd: i64,
    /// Requests whose tokens are the gateway's count (the provider reported
    /// none, or the answer broke off).
    pub estimated_requests: u64,
    /// Requests answered from the response cache, and what the provider
    /// calls they replaced would have cost (pico-dollars).
    pub cache_hits: u64,
    pub cache_saved_pusd: i64,
}

impl PeriodUsage {
    /// The counters in a fixed order, as a reload hands them over
    /// ([`Limiter::handover_usage`]).
    fn counts(&self) -> [i64; 7] {
        let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        [
            count(self.requests),
            count(self.prompt_tokens),
            count(self.completion_tokens),
            self.cost_pusd,
            count(self.estimated_requests),
            count(self.cache_hits),
            self.cache_saved_pusd,
        ]
    }

    /// [`PeriodUsage::counts`] read back; a negative one counts nothing.
    fn from_counts(counts: &[i64; 7]) -> Self {
        let count = |n: i64| u64::try_from(n).unwrap_or(0);
        PeriodUsage {
            requests: count(counts[0]),
            prompt_tokens: count(counts[1]),
            completion_tokens: count(counts[2]),
            cost_pusd: counts[3].max(0),
            estimated_requests: count(counts[4]),
            cache_hits: count(counts[5]),
            cache_saved_pusd: counts[6].max(0),
        }
    }

    /// What these counters hold beyond `earlier`'s (counters only grow).
    fn less(&self, earlier: &PeriodUsage) -> PeriodUsage {
        PeriodUsage {
            requests: self.requests.saturating_sub(earlier.requests),
            prompt_tokens: self.prompt_tokens.saturating_sub(earlier.prompt_tokens),
            completion_tokens: self
                .completion_tokens
                .saturating_sub(earlier.completion_tokens),
            cost_pusd: self.cost_pusd.saturating_sub(earlier.cost_pusd).max(0),
            estimated_requests: self
                .estimated_requests
                .saturating_sub(earlier.estimated_requests),
            cache_hits: self.cache_hits.saturating_sub(earlier.cache_hits),
            cache_saved_pusd: (self.cache_saved_pusd)
                .saturating_sub(earlier.cache_saved_pusd)
                .max(0),
        }
    }

    fn add(&mut self, other: &PeriodUsage) {
        self.requests = self.requests.saturating_add(other.requests);
        self.prompt_tokens = self.prompt_tokens.saturating_add(other.prompt_tokens);
        self.completion_tokens = self
            .completion_tokens
            .saturating_add(other.completion_tokens);
        self.cost_pusd = self.cost_pusd.saturating_add(other.cost_pusd);
        self.estimated_requests = self
            .estimated_requests
            .saturating_add(other.estimated_requests);
        self.cache_hits = self.cache_hits.saturating_add(other.cache_hits);
        self.cache_saved_pusd = self.cache_saved_pusd.saturating_add(other.cache_saved_pusd);
    }
}

/// Where an admission was decided, so the settlement goes to the same place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decided {
    /// The tenant has no limits: nothing was reserved.
    Unlimited,
    /// The in-process store (no Redis, or Redis unavailable).
    Local,
    /// Redis (the grant's lease, when the tenant has a concurrency limit,
    /// is a slot there).
    Redis,
}

/// An admitted request's claim on its tenant's limits. Settle it with
/// [`Limiter::settle`]; dropping it unsettled still frees its slot.
#[derive(Debug)]
pub struct Grant {
    tenant: usize,
    reserved_tokens: u64,
    /// The Redis concurrency slot asked for, when the tenant has a
    /// concurrency limit and Redis is configured.
    lease: Option<redis::Lease>,
    decided: Decided,
    settled: bool,
    limiter: Arc<Inner>,
    /// The limits' state after admission, for the response headers.
    pub state: RateLimitState,
}

impl Drop for Grant {
    /// The guard that cannot be skipped: a grant dropped unsettled (the
    /// request's task panicked, or its future was dropped) still frees its
    /// slot and in-flight count. A Redis lease stops being renewed and is
    /// released by the next flush.
    fn drop(&mut self) {
        if !self.settled {
            match self.decided {
                Decided::Local => self.limiter.local.release(self.tenant),
                Decided::Redis => {
                    if let (Some(redis), Some(lease)) = (&self.limiter.redis, self.lease) {
                        redis.abandon_lease(self.tenant, lease);
                    }
                }
                Decided::Unlimited => {}
            }
            self.limiter.inflight_done(self.tenant);
        }
    }
}

/// What the limiter needs of a finished request.
#[derive(Debug, Clone, Copy)]
pub struct Settlement {
    /// Tokens used (reported or estimated).
    pub usage: Usage,
    /// Their cost in pico-dollars.
    pub cost_pusd: i64,
    /// How long the request took, for the concurrency retry estimate.
    pub duration: Duration,
    /// A cache hit: what the provider call it replaced would have cost.
    pub cache_saved_pusd: Option<i64>,
}

/// The `/v1/usage` answer for one tenant.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageReport {
    /// `daily`, `monthly` or `total`.
    pub period: BudgetPeriod,
    /// The period's id (`2026-11`).
    pub period_id: String,
    /// The counters.
    pub usage: PeriodUsage,
    /// Whether shared state could not be read and the numbers are this
    /// instance's only.
    pub partial: bool,
}

#[derive(Debug)]
struct Inner {
    limits: Vec<TenantLimits>,
    tenant_ids: Vec<String>,
    /// Each tenant's `runestone_inflight_requests` gauge.
    inflight: Vec<prometheus::IntGauge>,
    local: local::LocalStore,
    redis: Option<redis::RedisStore>,
    /// EWMA of request durations per tenant, in ms: the estimate of when a
    /// concurrency slot frees up.
    durations_ms: Vec<AtomicU64>,
    /// Told whenever a tenant's request ends ([`Limiter::on_freed`]).
    on_freed: OnceLock<OnFreed>,
    /// Without Redis, the usage settled after a reload's handover, left
    /// for the new process and taken from the old ([`tail`]).
    tails: Option<tail::Tails>,
}

impl Inner {
    fn inflight_done(&self, tenant: usize) {
        self.inflight[tenant].dec();
        if let Some(on_freed) = self.on_freed.get() {
            (on_freed.0)(tenant);
        }
    }
}

/// What [`Limiter::on_freed`] calls with the tenant whose slot freed.
pub struct OnFreed(Box<dyn Fn(usize) + Send + Sync>);

impl std::fmt::Debug for OnFreed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnFreed")
    }
}

/// The admission facade the gateway uses.
#[derive(Debug, Clone)]
pub struct Limiter {
    inner: Arc<Inner>,
}

impl Limiter {
    /// Calls `f` with the tenant each time one of its requests ends
    /// (settled, released unused, or dropped): the moment a concurrency
    /// slot frees, so the overflow queue can hand it to a parked request
    /// before a newcomer takes it. Set once; later calls are ignored.
    pub fn on_freed(&self, f: impl Fn(usize) + Send + Sync + 'static) {
        let _ = self.inner.on_freed.set(OnFreed(Box::new(f)));
    }

    /// A limiter for the config's tenants, with Redis when configured
    /// (`conn`: the process's Redis connection, [`RedisConnection::for_config`]).
    pub fn new(config: &Config, conn: Option<Arc<RedisConnection>>) -> Self {
        let n = config.tenants.len();
        let redis = config
            .redis
            .as_ref()
            .zip(conn)
            .map(|(settings, conn)| redis::RedisStore::new(settings, &config.tenants, conn));
        Limiter {
            inner: Arc::new(Inner {
                limits: config.tenants.iter().map(|t| t.limits.clone()).collect(),
                tenant_ids: config.tenants.iter().map(|t| t.id.clone()).collect(),
                inflight: config
                    .tenants
                    .iter()
                    .map(|t| metrics::INFLIGHT.with_label_values(&[&t.id]))
                    .collect(),
                local: local::LocalStore::new(n),
                tails: redis
                    .is_none()
                    .then(|| tail::Tails::beside(&config.server.pid_file)),
                redis,
                durations_ms: (0..n).map(|_| AtomicU64::new(1000)).collect(),
                on_freed: OnceLock::new(),
            }),
        }
    }

    /// The Redis store, for its maintenance service.
    pub fn redis(&self) -> Option<redis::RedisStore> {
        self.inner.redis.clone()
    }

    /// What the process that takes over at a reload is handed (in
    /// [`HANDOVER_ENV`]): each budgeted tenant's spend in its current
    /// period as this instance knows it (the last read from Redis and what
    /// it owes Redis), which that process counts while Redis is unavailable
    /// ([`Limiter::count_handed_over`]). Empty without Redis. At most
    /// [`HANDOVER_BYTES`] (an environment variable's bound), the tenants
    /// nearest their budgets first.
    pub fn handover(&self) -> String {
        let inner = &self.inner;
        let Some(redis) = &inner.redis else {
            return String::new();
        };
        let now = now_ms();
        let mut spends: Vec<(f64, String)> = (0..inner.limits.len())
            .filter_map(|tenant| {
                let budget = inner.limits[tenant].budget?;
                let (period_id, _) = period_at(accounting_period(&inner.limits[tenant]), now);
                let spent = redis.known_spend(tenant, &period_id);
                let entry = (&inner.tenant_ids[tenant], &*period_id, spent);
                let share = spent as f64 / budget.amount_pusd.max(1) as f64;
                (spent > 0).then(|| (share, serde_json::to_string(&entry).unwrap_or_default()))
            })
            .collect();
        spends.sort_by(|a, b| b.0.total_cmp(&a.0));
        let (text, fitted) = handover_text(spends.iter().map(|(_, entry)| entry.as_str()));
        if fitted < spends.len() {
            tracing::warn!(tenants = spends.len(), left_out = spends.len() - fitted, "too many budgeted tenants to hand all their spend to the new process; those furthest from their budgets are left out");
        }
        text
    }

    /// Counts the spend a reload's predecessor knew ([`Limiter::handover`]'s
    /// text) for the tenants of this config, by id, until Redis is read.
    pub fn count_handed_over(&self, handover: &str) {
        let Some(redis) = &self.inner.redis else {
            return;
        };
        let Ok(spends) = serde_json::from_str::<Vec<(String, String, i64)>>(handover) else {
            tracing::warn!(
                "the spend handed over by the previous process cannot be read; not counted"
            );
            return;
        };
        let tenants = self.tenants_by_id();
        for (id, period_id, spent) in spends {
            if let Some(&tenant) = tenants.get(id.as_str()) {
                redis.count_known_spend(tenant, &period_id, spent);
            }
        }
    }

    /// This config's tenants by id, for what an earlier process (with its
    /// own config, in its own order) names by id.
    fn tenants_by_id(&self) -> std::collections::HashMap<&str, usize> {
        (self.inner.tenant_ids.iter())
            .enumerate()
            .map(|(tenant, id)| (id.as_str(), tenant))
            .collect()
    }

    /// What the process that takes over at a reload is handed without
    /// Redis (in [`HANDOVER_USAGE_ENV`]): each tenant's usage in its current
    /// accounting period (spend, requests, tokens), which that process
    /// counts as its own ([`Limiter::count_handed_over_usage`]), so that a
    /// reload neither reopens a spent budget nor empties `/v1/usage`. What
    /// this process settles after the handover (requests in flight, those
    /// it accepts until the new one listens) it leaves for that process
    /// when it ends ([`Limiter::leave_tail`]), with the usage of the tenants
    /// left out here. Empty with Redis, which holds the usage. At most
    /// [`HANDOVER_BYTES`], the tenants nearest their budgets, then the
    /// largest spenders, first.
    pub fn handover_usage(&self) -> String {
        let inner = &self.inner;
        if inner.redis.is_some() {
            return String::new();
        }
        let now = now_ms();
        let mut usages: Vec<(f64, i64, String, usize)> = (0..inner.limits.len())
            .filter_map(|tenant| {
                let limits = &inner.limits[tenant];
                let (period_id, _) = period_at(accounting_period(limits), now);
                let u = inner.local.hand_over(tenant, &period_id);
                let counts = u.counts();
                let share = limits.budget.map_or(0.0, |budget| {
                    u.cost_pusd as f64 / budget.amount_pusd.max(1) as f64
                });
                let entry = (&inner.tenant_ids[tenant], &*period_id, counts);
                (u != PeriodUsage::default()).then(|| {
                    (
                        share,
                        u.cost_pusd,
                        serde_json::to_string(&entry).unwrap_or_default(),
                        tenant,
                    )
                })
            })
            .collect();
        usages.sort_by(|a, b| b.0.total_cmp(&a.0).then(b.1.cmp(&a.1)));
        let (text, fitted) = handover_text(usages.iter().map(|(_, _, entry, _)| entry.as_str()));
        // Those left out are handed in full with the tail.
        for &(_, _, _, tenant) in &usages[fitted..] {
            inner.local.handed_none(tenant);
        }
        if fitted < usages.len() {
            tracing::warn!(tenants = usages.len(), left_out = usages.len() - fitted, "too many tenants to hand all their usage to the new process; those furthest from their budgets (then the smallest spenders) are left out");
        }
        text
    }

    /// Counts the usage a reload's predecessor held without Redis
    /// ([`Limiter::handover_usage`]'s text) as this process's own, for the
    /// tenants of this config, by id (a period that is not a tenant's
    /// current one, its budget's period changed, is never read).
    pub fn count_handed_over_usage(&self, handover: &str) {
        if self.inner.redis.is_some() || handover.is_empty() {
            return;
        }
        let Ok(usages) = serde_json::from_str::<Vec<(String, String, [i64; 7])>>(handover) else {
            tracing::warn!(
                "the usage handed over by the previous process cannot be read; not counted"
            );
            return;
        };
        let counted = self.count_as_own(&usages);
        tracing::info!(
            tenants = counted,
            handed = usages.len(),
            "counted the usage the previous process handed over"
        );
    }

    /// What the process that takes over at a reload is handed without
    /// Redis (in [`HANDOVER_MINUTES_ENV`]): the requests and tokens each
    /// tenant has taken of its minutes (by its TATs), which that process
    /// counts ([`Limiter::count_handed_over_minutes`]), so that
    /// a reload does not give a tenant a fresh minute. Empty with Redis,
    /// which holds them. At most [`HANDOVER_BYTES`], the minutes taken
    /// furthest first.
    pub fn handover_minutes(&self) -> String {
        let inner = &self.inner;
        if inner.redis.is_some() {
            return String::new();
        }
        let now = now_ms();
        let mut minutes: Vec<(f64, String)> = (0..inner.limits.len())
            .filter_map(|tenant| {
                let limits = &inner.limits[tenant];
                let [requests, tokens] = inner.local.minutes(tenant);
                // What is taken of each minute, as a share of it.
                let taken = |tat: f64, limit: Option<u64>| {
                    limit.map_or(0.0, |_| ((tat - now) / WINDOW_MS).clamp(0.0, 1.0))
                };
                let rpm = limits.requests_per_minute.map(u64::from);
                let tpm = limits.tokens_per_minute;
                let shares = (taken(requests, rpm), taken(tokens, tpm));
                // The units taken (requests, tokens), by limit.
                let used = |share: f64, limit: Option<u64>| share * limit.unwrap_or(0) as f64;
                let entry = (
                    &inner.tenant_ids[tenant],
                    used(shares.0, rpm),
                    used(shares.1, tpm),
                );
                let most = shares.0.max(shares.1);
                (most > 0.0).then(|| (most, serde_json::to_string(&entry).unwrap_or_default()))
            })
            .collect();
        minutes.sort_by(|a, b| b.0.total_cmp(&a.0));
        let (text, fitted) = handover_text(minutes.iter().map(|(_, entry)| entry.as_str()));
        if fitted < minutes.len() {
            tracing::warn!(tenants = minutes.len(), left_out = minutes.len() - fitted, "too many tenants to hand all their requests and tokens minutes to the new process; those least taken start afresh");
        }
        text
    }

    /// Counts the minutes a reload's predecessor held without Redis
    /// ([`Limiter::handover_minutes`]'s text) for the tenants of this
    /// config, by id: the requests and tokens taken of each minute are
    /// taken here too, against this config's limits (a raised limit has
    /// the rest of its minute), never more than the whole minute.
    pub fn count_handed_over_minutes(&self, handover: &str) {
        if self.inner.redis.is_some() || handover.is_empty() {
            return;
        }
        let Ok(minutes) = serde_json::from_str::<Vec<(String, f64, f64)>>(handover) else {
            tracing::warn!("the requests and tokens minutes handed over by the previous process cannot be read; they start afresh");
            return;
        };
        let tenants = self.tenants_by_id();
        let now = now_ms();
        for (id, requests, tokens) in &minutes {
            let Some(&tenant) = tenants.get(id.as_str()) else {
                continue;
            };
            let limits = &self.inner.limits[tenant];
            // When the minute has room again for what was taken of it.
            let tat = |used: f64, limit: Option<u64>| {
                limit.map_or(0.0, |limit| {
                    now + (used / limit.max(1) as f64).clamp(0.0, 1.0) * WINDOW_MS
                })
            };
            let tats = [
                tat(*requests, limits.requests_per_minute.map(u64::from)),
                tat(*tokens, limits.tokens_per_minute),
            ];
            self.inner.local.count_minutes(tenant, tats);
        }
    }

    /// Whose usage settled after their handovers the process taking over
    /// at a reload waits for (in [`AWAITED_ENV`]): this process's and what
    /// it still waits for itself. Empty with Redis.
    pub fn handover_awaited(&self) -> String {
        self.inner
            .tails
            .as_ref()
            .map_or_else(String::new, tail::Tails::handover)
    }

    /// Waits for the usage the processes a reload's predecessor named
    /// ([`Limiter::handover_awaited`]'s text) settle after their handovers,
    /// taken by [`Limiter::take_tails`].
    pub fn await_tails(&self, awaited: &str) {
        if let Some(tails) = self.inner.tails.as_ref().filter(|_| !awaited.is_empty()) {
            tails.await_writers(awaited);
        }
    }

    /// Removes the files of usage left at reloads that no process took
    /// within ten minutes (see [`tail`]), without Redis.
    pub fn remove_stale_tails(&self) {
        if let Some(tails) = &self.inner.tails {
            tails.remove_stale();
        }
    }

    /// Takes the usage left by the processes waited for, every quarter
    /// second until none is waited for or `shutdown` turns true, and counts
    /// it as this process's own (a period not the tenant's current one is
    /// not counted).
    pub async fn take_tails(&self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let Some(tails) = &self.inner.tails else {
            return;
        };
        while tails.awaits() {
            let taken = tails.take();
            if !taken.is_empty() {
                let counted = self.count_as_own(&taken);
                tracing::info!(
                    tenants = counted,
                    left = taken.len(),
                    "counted the usage an earlier process settled after its handover"
                );
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Counts usage an earlier process held (by tenant id and period, as
    /// [`PeriodUsage::counts`]) as this process's own, for the tenants of
    /// this config in their current period (an older one is never read):
    /// how many entries were counted.
    fn count_as_own(&self, usages: &[(String, String, [i64; 7])]) -> usize {
        let tenants = self.tenants_by_id();
        let now = now_ms();
        let mut counted = 0;
        for (id, period_id, counts) in usages {
            let Some(&tenant) = tenants.get(id.as_str()) else {
                continue;
            };
            let (current, _) = period_at(accounting_period(&self.inner.limits[tenant]), now);
            if **period_id == *current {
                let usage = PeriodUsage::from_counts(counts);
                self.inner.local.record(tenant, period_id, &usage);
                counted += 1;
            }
        }
        counted
    }

    /// Leaves, when this process has handed its usage over at a reload,
    /// what it settled after that for the new process (and the usage of
    /// the tenants the handover left out). Called when the process ends,
    /// with nothing in flight.
    pub fn leave_tail(&self) {
        let inner = &self.inner;
        let Some(tails) = inner.tails.as_ref().filter(|tails| tails.handed_over()) else {
            return;
        };
        let usage = (0..inner.limits.len())
            .filter_map(|tenant| {
                let (period_id, usage) = inner.local.tail(tenant)?;
                Some((inner.tenant_ids[tenant].clone(), period_id, usage.counts()))
            })
            .collect();
        tails.leave(usage);
    }

    /// What Redis admitted that the in-process store counts while Redis is
    /// unavailable: the last known shared spend, and this instance's
    /// requests in flight with a Redis slot.
    fn held_in_redis(&self, tenant: usize, period_id: &str) -> local::Elsewhere {
        let Some(redis) = &self.inner.redis else {
            return local::Elsewhere::default();
        };
        local::Elsewhere {
            spent: redis.known_spend(tenant, period_id),
            held: redis.leases_of(tenant),
        }
    }

    /// Counts a request held back by `limit` in `runestone_rate_limited_total`:
    /// once per request, by the caller that refused it (the overflow queue's
    /// retries for a parked request are not refusals).
    pub fn count_refusal(&self, tenant: usize, limit: LimitKind) {
        metrics::RATE_LIMITED
            .with_label_values(&[&self.inner.tenant_ids[tenant], limit.label()])
            .inc();
    }

    /// Admits a request of `tokens` estimated tokens for `tenant`, or says
    /// which limit refuses it and for how long.
    pub async fn admit(&self, tenant: usize, tokens: u64) -> Result<Grant, Refusal> {
        let inner = &self.inner;
        let limits = &inner.limits[tenant];
        // No request reserves more than the whole minute, nor more than any
        // request could use (the figure may come from a stored job).
        let tokens = limits
            .tokens_per_minute
            .map_or(tokens, |tpm| tokens.min(tpm))
            .min(MAX_RESERVED_TOKENS);
        let now = now_ms();
        let (period_id, period_left_ms) = period_at(accounting_period(limits), now);
        let decided = if !limits.is_limited() {
            Ok((Decided::Unlimited, RateLimitState::default(), None))
        } else {
            let from_redis = match &inner.redis {
                Some(redis) => {
                    // What this instance admitted while Redis was away
                    // counts there too, until it ends.
                    let outside = inner.local.outside_redis(tenant);
                    let ask = redis::AdmitRequest {
                        tokens,
                        period_id: &period_id,
                        outside,
                    };
                    redis.admit(tenant, limits, ask).await
                }
                None => None,
            };
            match from_redis {
                Some(result) => result.map(|(state, slot)| (Decided::Redis, state, slot)),
                None => {
                    // And what Redis admitted counts here.
                    let elsewhere = self.held_in_redis(tenant, &period_id);
                    inner
                        .local
                        .admit(
                            tenant,
                            limits,
                            tokens,
                            &period_id,
                            elsewhere,
                            // Redis may have taken a while to fail.
                            if inner.redis.is_some() { now_ms() } else { now },
                        )
                        .map(|state| (Decided::Local, state, None))
                }
            }
        };
        match decided {
            Ok((decided, state, lease)) => {
                inner.inflight[tenant].inc();
                Ok(Grant {
                    tenant,
                    reserved_tokens: tokens,
                    lease,
                    decided,
                    settled: false,
                    limiter: inner.clone(),
                    state,
                })
            }
            Err(mut refusal) => {
                refusal.retry_after_ms = match refusal.limit {
                    LimitKind::Budget => period_left_ms,
                    LimitKind::Concurrency => {
                        let typical = inner.durations_ms[tenant].load(Ordering::Relaxed);
                        Some(typical.clamp(100, 30_000))
                    }
                    _ => refusal.retry_after_ms,
                };
                Err(refusal)
            }
        }
    }

    /// Settles a finished request: frees its slot, corrects its token
    /// reservation with the real usage and adds its spend.
    pub async fn settle(&self, mut grant: Grant, settlement: Settlement) {
        grant.settled = true;
        let inner = &self.inner;
        let tenant = grant.tenant;
        let limits = &inner.limits[tenant];
        let ewma = &inner.durations_ms[tenant];
        let sample = settlement.duration.as_millis().min(u128::from(u32::MAX)) as u64;
        let old = ewma.load(Ordering::Relaxed);
        ewma.store((old * 7 + sample) / 8, Ordering::Relaxed);

        let now = now_ms();
        let (period_id, _) = period_at(accounting_period(limits), now);
        let token_delta = signed(settlement.usage.total()) - signed(grant.reserved_tokens);
        let record = PeriodUsage {
            requests: 1,
            prompt_tokens: settlement.usage.prompt_tokens,
            completion_tokens: settlement.usage.completion_tokens,
            cost_pusd: settlement.cost_pusd,
            estimated_requests: u64::from(settlement.usage.estimated),
            cache_hits: u64::from(settlement.cache_saved_pusd.is_some()),
            cache_saved_pusd: settlement.cache_saved_pusd.unwrap_or(0),
        };
        self.give_back(&grant, (0, token_delta), (&period_id, now), &record)
            .await;
        if let Some(budget) = limits.budget {
            let spent = match &inner.redis {
                // The settlement is counted there already: answered, or
                // owed (kept for the flush).
                Some(redis) => redis.known_spend(tenant, &period_id),
                None => inner.local.usage(tenant, &period_id).cost_pusd,
            };
            metrics::BUDGET_USED
                .with_label_values(&[&inner.tenant_ids[tenant]])
                .set(spent as f64 / budget.amount_pusd as f64);
        }
        // Only now is the slot free everywhere.
        inner.inflight_done(tenant);
    }

    /// Gives back a grant that was never used (nothing was sent upstream):
    /// its slot, its request and its tokens are returned, and nothing is
    /// recorded: no usage, no request, no duration sample.
    pub async fn release(&self, mut grant: Grant) {
        grant.settled = true;
        let now = now_ms();
        let (period_id, _) = period_at(accounting_period(&self.inner.limits[grant.tenant]), now);
        let reserved = signed(grant.reserved_tokens);
        let unused = PeriodUsage::default();
        self.give_back(&grant, (-1, -reserved), (&period_id, now), &unused)
            .await;
        self.inner.inflight_done(grant.tenant);
    }

    /// Returns a grant's slot and corrects its reservation by
    /// `request_delta` requests and `token_delta` tokens, where it was
    /// decided; records `record` in the usage of period `period_id`, which
    /// holds `now` (Unix ms).
    async fn give_back(
        &self,
        grant: &Grant,
        (request_delta, token_delta): (i64, i64),
        (period_id, now): (&Arc<str>, f64),
        record: &PeriodUsage,
    ) {
        let inner = &self.inner;
        let tenant = grant.tenant;
        let limits = &inner.limits[tenant];
        let used = *record != PeriodUsage::default();
        if grant.decided != Decided::Redis {
            if grant.decided == Decided::Local {
                inner
                    .local
                    .settle_limits(tenant, limits, request_delta, token_delta, now);
            }
            if inner.redis.is_none() && used {
                inner.local.record(tenant, period_id, record);
            }
        }
        if let Some(redis) = &inner.redis {
            let by_redis = grant.decided == Decided::Redis;
            if by_redis || used {
                let request = redis::SettleRequest {
                    request_delta: if by_redis { request_delta } else { 0 },
                    token_delta: if by_redis { token_delta } else { 0 },
                    lease: grant.lease.filter(|_| by_redis),
                    period_id,
                    usage: record,
                };
                redis.settle(tenant, limits, request).await;
            }
        }
    }

    /// The tenant's usage in its current accounting period.
    pub async fn usage(&self, tenant: usize) -> UsageReport {
        let limits = &self.inner.limits[tenant];
        let period = accounting_period(limits);
        let (period_id, _) = period_at(period, now_ms());
        let (usage, partial) = match &self.inner.redis {
            Some(redis) => redis.usage(tenant, &period_id).await,
            None => (self.inner.local.usage(tenant, &period_id), false),
        };
        UsageReport {
            period,
            period_id: period_id.to_string(),
            usage,
            partial,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A limiter without Redis for one tenant, `acme`, of `limits` (YAML).
    fn limiter(limits: &str) -> Limiter {
        let yaml = format!(
            "server: {{ listen: \"127.0.0.1:8080\" }}\nproviders:\n  - {{ name: p, base_url: \"http://127.0.0.1:9000/v1\" }}\nmodels:\n  - {{ name: m, targets: [{{ provider: p }}] }}\ntenants:\n  - {{ id: acme, keys: [\"k-acme-1\"], limits: {limits} }}\n"
        );
        let config = Config::from_yaml(&yaml, |_| None).unwrap();
        Limiter::new(&config, None)
    }

    #[test]
    fn handed_over_minutes_count_against_the_new_limits_and_never_past_a_minute() {
        let old = limiter("{ requests_per_minute: 3, tokens_per_minute: 1000 }");
        let now = now_ms();
        for _ in 0..3 {
            old.inner
                .local
                .admit(
                    0,
                    &old.inner.limits[0],
                    100,
                    "p",
                    local::Elsewhere::default(),
                    now,
                )
                .unwrap();
        }
        let handed = old.handover_minutes();
        let entries: Vec<(String, f64, f64)> = serde_json::from_str(&handed).unwrap();
        assert_eq!(entries.len(), 1);
        assert!((entries[0].1 - 3.0).abs() < 0.01, "{handed}");
        assert!((entries[0].2 - 300.0).abs() < 1.0, "{handed}");
        // Raised to 6 a minute: three left.
        let new = limiter("{ requests_per_minute: 6 }");
        new.count_handed_over_minutes(&handed);
        let admitted = (0..10)
            .take_while(|_| {
                let l = &new.inner.limits[0];
                new.inner
                    .local
                    .admit(0, l, 1, "p", local::Elsewhere::default(), now_ms())
                    .is_ok()
            })
            .count();
        assert_eq!(admitted, 3);
        // Whatever a predecessor claims: never more than the whole minute,
        // and text that does not read changes nothing.
        for hostile in [
            r#"[["acme", 1e308, 1e308]]"#,
            r#"[["acme", -5, -1e308]]"#,
            r#"[["unknown", 1e9, 1e9]]"#,
            r#"[["acme", "NaN", 1]]"#,
            "not json",
            "",
        ] {
            let new = limiter("{ requests_per_minute: 6, tokens_per_minute: 1000 }");
            new.count_handed_over_minutes(hostile);
            let [requests, tokens] = new.inner.local.minutes(0);
            let most = now_ms() + WINDOW_MS;
            assert!(requests <= most && tokens <= most, "{hostile}");
        }
    }

    #[test]
    fn gcra_weighs_tokens() {
        let now = 0.0;
        let tat = gcra::take(0.0, now, 1000.0, 600.0).unwrap();
        assert!(gcra::take(tat, now, 1000.0, 401.0).is_err());
        let tat = gcra::take(tat, now, 1000.0, 400.0).unwrap();
        assert_eq!(window(tat, now, 1000).remaining, 0);
        // After 6 s, 100 tokens are back.
        assert_eq!(window(tat, now + 6000.0, 1000).remaining, 100);
    }

    #[test]
    fn window_describes_remaining_and_reset() {
        let now = 10_000.0;
        assert_eq!(
            window(0.0, now, 60),
            Window {
                limit: 60,
                remaining: 60,
                reset_ms: 0
            }
        );
        let tat = now + 3000.0; // three requests of a 60/min limit used
        assert_eq!(
            window(tat, now, 60),
            Window {
                limit: 60,
                remaining: 57,
                reset_ms: 3000
            }
        );
    }
}
