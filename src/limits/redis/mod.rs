//! The Redis limit store: limits and spend shared by every gateway instance
//! that uses the same Redis.
//!
//! Keys of one tenant share a hash tag so Redis Cluster keeps them on one
//! slot: `{prefix}:{tenant}:rate` (hash: the two GCRA TATs and how many
//! holds there are), `{prefix}:{tenant}:inflight` (sorted set: concurrency
//! leases scored by expiry), `{prefix}:{tenant}:holds` (set: quota taken
//! ahead, `redis.lease`), `{prefix}:{tenant}:usage:{period}` (hash: requests, tokens,
//! spend). Admissions and settlements are group-committed by a `Batcher`:
//! those queued while a round trip is out go together in the next, one
//! `EVALSHA` of `ADMIT` or `SETTLE` per tenant and period, all in one
//! pipeline (scripts are loaded again on `NOSCRIPT`). The scripts decide
//! each request in order, all or nothing, exactly as one call per request
//! would, and use Redis's clock, so instances with skewed clocks agree.
//!
//! Every call is bounded by `redis.timeout_ms`, a batched one from the moment
//! it is queued. A failure marks the store
//! down (logged once, `runestone_redis_up 0`, `runestone_redis_errors_total`)
//! and the limiter falls back to in-process counters until
//! [`RedisMaintenance`] sees Redis answer again; spend recorded meanwhile is
//! kept here and flushed then. Leases held by this instance are renewed
//! while their requests run; those of a crashed instance expire after
//! [`LEASE_TTL_MS`]. With `redis.lease` (`pool`), admissions mostly
//! skip Redis: an instance takes a share of each limit ahead, keeps the
//! slots of requests that end, owes its usage as through an outage, and
//! gives back what it does not use.

mod batcher;
mod debts;
mod ledger;
mod maintenance;
mod pool;
mod scripts;

pub use debts::warn_of_debts_left_beside;
pub use maintenance::RedisMaintenance;

use super::{PeriodUsage, RateLimitState, Refusal};
use crate::config::{RedisSettings, TenantLimits, TenantSettings};
use crate::lock;
use crate::metrics;
use crate::redis_conn::{Conn, RedisConnection};
use batcher::{AdmitOp, Batcher, Op, Reply};
use debts::{Debt, DebtFile, Written};
use ledger::{Shared, Unsettled};
use pool::Pools;
use redis::{RedisResult, Script};
use scripts::{AdmitAnswer, ADMIT, RENEW, SETTLE};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

/// How long a concurrency lease lives without renewal.
pub const LEASE_TTL_MS: u64 = 30_000;

/// A concurrency slot's id in Redis: 128 random bits, which Redis sees as
/// 32 lowercase hex digits. Copied, not allocated, on its way from the
/// admission to the settlement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Lease([u8; 16]);

impl Lease {
    /// A new, random lease id.
    pub fn random() -> Self {
        Lease(rand::random())
    }

    /// The id as Redis stores it.
    fn hex(self) -> [u8; 32] {
        let mut out = [0; 32];
        hex::encode_to_slice(self.0, &mut out).expect("16 bytes are 32 hex digits");
        out
    }
}

impl redis::ToRedisArgs for Lease {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + redis::RedisWrite,
    {
        out.write_arg(&self.hex());
    }
}

/// How often held leases are renewed.
const RENEW_EVERY: Duration = Duration::from_millis(LEASE_TTL_MS / 3);

/// How long the start-up connection may take.
const WARM_UP: Duration = Duration::from_secs(5);

/// How often a down Redis is probed, and pending spend flushed.
const PROBE_EVERY: Duration = Duration::from_millis(500);

pub(super) struct Keys {
    pub(super) rate: String,
    pub(super) inflight: String,
    /// Quota instances hold (`redis.lease`), a set.
    pub(super) holds: String,
    pub(super) usage_prefix: String,
    /// The start of the keys recording which of this instance's settlement
    /// batches Redis applied: `{prefix}:{tenant}:settled:{instance}:`,
    /// then the batch number's block (see [`Keys::settled`]).
    pub(super) settled_prefix: String,
    /// The number the tenant's next settlement batch gets.
    pub(super) next_batch: AtomicU64,
}

/// Settlement batches per record key: a hash of 2,048 fields at most.
const BATCHES_PER_KEY: u64 = 1 << 16;

impl Keys {
    /// The usage hash of one period: `{prefix}:{tenant}:usage:{period}`.
    pub(super) fn usage(&self, period_id: &str) -> String {
        format!("{}{period_id}", self.usage_prefix)
    }

    /// A number for a new settlement batch of this tenant.
    pub(super) fn new_batch(&self) -> u64 {
        self.next_batch.fetch_add(1, Ordering::Relaxed)
    }

    /// Where Redis records that `batch` was applied: the key of its block
    /// of [`BATCHES_PER_KEY`] batches, and its bit there (a field holds 32).
    /// Two bytes or so a batch (a set of ids took about 130 bytes each:
    /// 150 MB for a busy tenant's ten minutes), and a block's key expires
    /// once its batches are older than [`scripts::SETTLED_TTL_MS`].
    pub(super) fn settled(&self, batch: u64) -> (String, u64) {
        (
            format!("{}{}", self.settled_prefix, batch / BATCHES_PER_KEY),
            batch % BATCHES_PER_KEY,
        )
    }
}

/// One settlement (or an unused grant's release), as the batched
/// `SETTLE` takes it.
pub(super) struct SettleOp {
    pub(super) tenant: usize,
    pub(super) period_id: Arc<str>,
    pub(super) rpm: u64,
    pub(super) tpm: u64,
    /// -1 to give the request back (an unused grant), -n to give back n
    /// taken ahead and not used (`redis.lease`), else 0.
    pub(super) request_delta: i64,
    pub(super) token_delta: i64,
    /// `None` when the request held no Redis slot.
    pub(super) lease: Option<Lease>,
    pub(super) usage: PeriodUsage,
    pub(super) reply: Reply<()>,
}

struct Inner {
    conn: Arc<RedisConnection>,
    timeout: Duration,
    keys: Arc<[Keys]>,
    /// Whether Redis is up, and what is owed to it.
    shared: Arc<Shared>,
    /// The batching task's queue, started on first use (inside the runtime);
    /// `None` when no connection could be set up.
    batches: OnceLock<Option<mpsc::UnboundedSender<Op>>>,
    renew: Script,
    settle: Script,
    /// Spend last read from Redis, per tenant: (period, pUSD).
    known_spend: Vec<Mutex<(String, i64)>>,
    /// Leases this instance holds: lease id -> tenant (foldhash: one in
    /// and out a request, and the ids are this process's random draws).
    leases: Mutex<foldhash::HashMap<Lease, usize>>,
    /// The tenants' ids, by index (debts are written down by id).
    ids: Vec<String>,
    /// Where what is owed is written down while it is owed, when the
    /// process keeps it beside its pid file ([`RedisStore::keep_debts_beside`]).
    debts: OnceLock<DebtFile>,
    /// [`SETTLE`], as debts written down carry it.
    settle_text: Arc<str>,
    /// Quota taken ahead, with `redis.lease`.
    pools: Option<Pools>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("up", &self.shared.up)
            .finish_non_exhaustive()
    }
}

/// Limits and spend in Redis, shared across instances.
#[derive(Debug, Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

/// One admission as the limiter hands it to the store.
#[derive(Debug, Clone, Copy)]
pub struct AdmitRequest<'a> {
    /// The tokens it reserves.
    pub tokens: u64,
    /// The accounting period it falls in.
    pub period_id: &'a Arc<str>,
    /// What this instance admitted while Redis was unavailable
    /// ([`super::local::LocalStore::outside_redis`]).
    pub outside: [u64; 3],
}

/// One settlement as the limiter hands it to the store.
#[derive(Debug, Clone, Copy)]
pub struct SettleRequest<'a> {
    /// -1 to give the request back (an unused grant), else 0.
    pub request_delta: i64,
    /// Real tokens minus reserved ones (0 when Redis did not admit it).
    pub token_delta: i64,
    /// The Redis concurrency lease to release, if Redis admitted it.
    pub lease: Option<Lease>,
    /// The period the usage counts in.
    pub period_id: &'a Arc<str>,
    /// What the request used.
    pub usage: &'a PeriodUsage,
}

impl RedisStore {
    /// A store for these tenants; connects lazily, on first use.
    pub fn new(
        settings: &RedisSettings,
        tenants: &[TenantSettings],
        conn: Arc<RedisConnection>,
    ) -> Self {
        // Settlement batches are numbered per instance, so their records
        // (one bit each) never collide with another instance's.
        let instance = &crate::ids::random_token()[..16];
        let keys: Arc<[Keys]> = tenants
            .iter()
            .map(|t| {
                let base = format!("{}:{{{}}}", settings.key_prefix, t.id);
                Keys {
                    rate: format!("{base}:rate"),
                    inflight: format!("{base}:inflight"),
                    holds: format!("{base}:holds"),
                    usage_prefix: format!("{base}:usage:"),
                    settled_prefix: format!("{base}:settled:{instance}:"),
                    next_batch: AtomicU64::new(0),
                }
            })
            .collect();
        // Down until Redis first answers (the start-up connection).
        metrics::REDIS_UP.set(0);
        // Every operation's error count starts at 0, so rates work at once.
        for op in [
            "admit", "settle", "usage", "flush", "renew", "overflow", "connect",
        ] {
            metrics::REDIS_ERRORS.with_label_values(&[op]);
        }
        RedisStore {
            inner: Arc::new(Inner {
                conn,
                timeout: settings.timeout,
                keys,
                shared: Arc::new(Shared::new(tenants.len())),
                batches: OnceLock::new(),
                renew: Script::new(RENEW),
                settle: Script::new(SETTLE),
                known_spend: tenants.iter().map(|_| Mutex::default()).collect(),
                leases: Mutex::default(),
                ids: tenants.iter().map(|t| t.id.clone()).collect(),
                debts: OnceLock::new(),
                settle_text: Arc::from(SETTLE),
                pools: settings
                    .lease
                    .map(|lease| Pools::new(lease, settings.timeout, tenants)),
            }),
        }
    }

    /// Whether Redis answers for every tenant (what `/ready` and
    /// `runestone_redis_up` say).
    pub fn is_up(&self) -> bool {
        self.inner.shared.all_up() && self.inner.conn.is_configured()
    }

    /// Whether Redis answered `tenant`'s last call (its keys' primary, on a
    /// cluster).
    fn tenant_up(&self, tenant: usize) -> bool {
        self.inner.shared.is_up(tenant) && self.inner.conn.is_configured()
    }

    /// The shared connection; must be called inside the Tokio runtime.
    fn connection(&self) -> Option<Conn> {
        self.inner.conn.get()
    }

    /// Runs one bounded Redis call on `tenant`'s keys (several tenants'
    /// for `None`); a failure marks them down.
    async fn call<T, F, Fut>(&self, tenant: Option<usize>, op: &'static str, f: F) -> Option<T>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let conn = self.connection()?;
        let error = match tokio::time::timeout(self.inner.timeout, f(conn)).await {
            Ok(Ok(value)) => return Some(value),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {:?}", self.inner.timeout),
        };
        self.inner.shared.failed(tenant, op, &error);
        None
    }

    /// The batching task's queue, started on first use: on the runtime of
    /// the request that first needs it, with a connection of its own whose
    /// drivers run there too (the shared one's run where it was first used,
    /// the background services' runtime).
    fn queue(&self) -> Option<&mpsc::UnboundedSender<Op>> {
        self.inner
            .batches
            .get_or_init(|| {
                let conn = self.connection()?;
                let own = self
                    .inner
                    .conn
                    .dedicated()
                    .map(|own| tokio::spawn(warm_up(own)));
                let (queue, ops) = mpsc::unbounded_channel();
                let batcher = Batcher {
                    conn,
                    own,
                    admit: Script::new(ADMIT),
                    settle: self.inner.settle.clone(),
                    keys: self.inner.keys.clone(),
                    timeout: self.inner.timeout,
                    hold_ttl_ms: self.inner.pools.as_ref().map_or(0, |p| p.hold_ttl_ms),
                    shared: self.inner.shared.clone(),
                };
                tokio::spawn(batcher.run(ops));
                Some(queue)
            })
            .as_ref()
    }

    /// Waits, within the timeout, for the batching task's answer to an
    /// operation it was handed. `None` (the store marked down) when Redis did
    /// not answer in time or refused the batch.
    async fn answer<T>(
        &self,
        tenant: usize,
        op: &'static str,
        answer: oneshot::Receiver<Result<T, String>>,
    ) -> Option<T> {
        let error = match tokio::time::timeout(self.inner.timeout, answer).await {
            Ok(Ok(Ok(value))) => return Some(value),
            Ok(Ok(Err(e))) => e,
            Ok(Err(_)) => "the Redis batching task has stopped".to_string(),
            Err(_) => format!("no answer within {:?}", self.inner.timeout),
        };
        self.inner.shared.failed(Some(tenant), op, &error);
        None
    }

    /// Admits in Redis, or against quota taken from it ahead
    /// (`redis.lease`): the headers' view, and the concurrency slot the
    /// request holds (the one asked for, or one the pool kept). `None` when
    /// Redis cannot decide (the caller falls back to the in-process store).
    pub async fn admit(
        &self,
        tenant: usize,
        limits: &TenantLimits,
        request: AdmitRequest<'_>,
    ) -> Option<Result<(RateLimitState, Option<Lease>), Refusal>> {
        let AdmitRequest {
            tokens,
            period_id,
            outside: [held_outside, requests_tat_outside, tokens_tat_outside],
        } = request;
        if !self.tenant_up(tenant) {
            return None;
        }
        let pools = self.inner.pools.as_ref();
        if let Some(pools) = pools {
            // The spend last read from Redis (at most `redis.lease.ms` ago)
            // and this instance's since: at or over the budget, Redis
            // decides.
            let within_budget = || {
                (limits.budget).is_none_or(|b| self.known_spend(tenant, period_id) < b.amount_pusd)
            };
            for look in 0..2 {
                if within_budget() {
                    if let Some((slot, state)) = pools.take(tenant, limits, tokens, pool::now()) {
                        if let Some(slot) = slot {
                            lock(&self.inner.leases).insert(slot, tenant);
                        }
                        return Some(Ok((state, slot)));
                    }
                }
                if look == 0 && pools.pooled(tenant) {
                    // Another admission is taking a share: it may be this
                    // one's (a burst's own requests come first).
                    let _ =
                        tokio::time::timeout(self.inner.timeout, pools.await_refill(tenant)).await;
                }
            }
        }
        let queue = self.queue()?;
        // A slot the pool kept goes with the request Redis decides (the
        // pool could not admit it for another limit): Redis counts it as
        // the request's own. Otherwise a new lease id names the slot.
        let kept = pools
            .filter(|_| limits.max_concurrent.is_some())
            .and_then(|pools| pools.kept_slot(tenant));
        let lease = kept.or_else(|| limits.max_concurrent.map(|_| Lease::random()));
        let ask = pools.map(|pools| pools.ask(tenant, pool::now()));
        let (reply, answer) = oneshot::channel();
        let op = Op::Admit(AdmitOp {
            tenant,
            period_id: period_id.clone(),
            limits: [
                u64::from(limits.requests_per_minute.unwrap_or(0)),
                limits.tokens_per_minute.unwrap_or(0),
                u64::from(limits.max_concurrent.unwrap_or(0)),
                limits.budget.map_or(0, |b| b.amount_pusd.max(0) as u64),
                if limits.budget.is_some() {
                    lock(&self.inner.shared.ledger).uncounted_spend(tenant, period_id)
                } else {
                    0
                },
                held_outside,
                requests_tat_outside,
                tokens_tat_outside,
            ],
            tokens: Some(tokens),
            lease,
            kept: kept.is_some(),
            extra: ask.as_ref().map_or([0, 0], |ask| ask.extra),
            back: ask.as_ref().map_or([0, 0], |ask| ask.back),
            release: ask.as_ref().and_then(|ask| ask.release),
            hold: ask.as_ref().and_then(|ask| ask.hold),
            reply,
        });
        let answer = match queue.send(op) {
            Ok(()) => self.answer(tenant, "admit", answer).await,
            Err(_) => {
                self.inner.shared.failed(
                    Some(tenant),
                    "admit",
                    "the Redis batching task has stopped",
                );
                None
            }
        };
        let Some(AdmitAnswer {
            refused,
            leased,
            now,
            requests_tat,
            tokens_tat,
            spent,
        }) = answer
        else {
            // An admission that timed out may still run once Redis answers
            // again (a frozen Redis reads it later) and take a slot nobody
            // holds: release it with the flush.
            if let Some(lease) = lease {
                lock(&self.inner.shared.ledger)
                    .unreleased
                    .push((tenant, lease));
            }
            return None;
        };
        let mut known = lock(&self.inner.known_spend[tenant]);
        if *known.0 != **period_id {
            known.0 = period_id.to_string();
        }
        known.1 = spent;
        drop(known);
        let mut state = RateLimitState {
            requests: limits
                .requests_per_minute
                .map(|rpm| super::window(requests_tat, now, u64::from(rpm))),
            tokens: limits
                .tokens_per_minute
                .map(|tpm| super::window(tokens_tat, now, tpm)),
        };
        if let (Some(pools), Some(ask)) = (pools, ask) {
            let read = [now, requests_tat, tokens_tat];
            let view = pools.answered((ask, leased), limits, read, pool::now());
            if refused.is_empty() {
                // What this instance may still admit: the pool's too.
                state = view;
            }
        }
        if let (Some(pools), Some(slot)) = (pools, kept.filter(|_| !refused.is_empty())) {
            // Refused for another limit, the kept slot is still held for
            // the next request; refused for concurrency, Redis no longer
            // held it.
            if refused == "concurrency" || !pools.keep(tenant, slot, pool::now()) {
                lock(&self.inner.shared.ledger)
                    .unreleased
                    .push((tenant, slot));
            }
        }
        if refused.is_empty() {
            if let Some(lease) = lease {
                lock(&self.inner.leases).insert(lease, tenant);
            }
            return Some(Ok((state, lease)));
        }
        let limit = super::LimitKind::from_label(&refused)?;
        let retry_after_ms = match limit {
            super::LimitKind::Requests => limits
                .requests_per_minute
                .and_then(|rpm| crate::gcra::take(requests_tat, now, f64::from(rpm), 1.0).err()),
            super::LimitKind::Tokens => limits.tokens_per_minute.and_then(|tpm| {
                crate::gcra::take(tokens_tat, now, tpm as f64, tokens as f64).err()
            }),
            _ => None,
        };
        Some(Err(Refusal {
            limit,
            retry_after_ms: retry_after_ms.map(|ms| ms.ceil() as u64),
            state,
        }))
    }

    /// Settles in Redis: limit corrections, lease release, usage counters,
    /// applied once (see `SETTLE`). From the moment it is handed over the
    /// settlement is the store's: applied now, or kept and sent by the flush
    /// (under the same batch id) when Redis is down or does not answer.
    ///
    /// With `redis.lease`, when the pool keeps the request's slot for the
    /// tenant's next request (or it held none), nothing waits for Redis:
    /// the limit corrections go to the pool, given back with what it holds,
    /// and the usage is owed as while Redis is down (written down beside
    /// the pid file, counted in the budget's view, sent by the flush a
    /// quarter of `redis.lease.ms` later at most). A slot the pool has no
    /// room for is released as without it, before the last byte.
    pub async fn settle(&self, tenant: usize, limits: &TenantLimits, request: SettleRequest<'_>) {
        let lease = request.lease;
        if let Some(lease) = &lease {
            lock(&self.inner.leases).remove(lease);
        }
        let queue = self.tenant_up(tenant).then(|| self.queue()).flatten();
        let Some(queue) = queue else {
            self.inner
                .shared
                .defer(tenant, request.period_id, lease, request.usage);
            return;
        };
        if let Some(pools) = (self.inner.pools.as_ref()).filter(|pools| pools.pooled(tenant)) {
            // The slot kept for the next request (or none held), the rest
            // stays here: the corrections with what the pool holds, the
            // usage owed, written down and sent with the next flush.
            if lease.is_none_or(|slot| pools.keep(tenant, slot, pool::now())) {
                pools.correct(tenant, -request.request_delta, -request.token_delta);
                self.inner
                    .shared
                    .owe(tenant, request.period_id, request.usage);
                return;
            }
        }
        let (reply, answer) = oneshot::channel();
        let op = SettleOp {
            tenant,
            period_id: request.period_id.clone(),
            rpm: u64::from(limits.requests_per_minute.unwrap_or(0)),
            tpm: limits.tokens_per_minute.unwrap_or(0),
            request_delta: request.request_delta,
            token_delta: request.token_delta,
            lease,
            usage: request.usage.clone(),
            reply,
        };
        match queue.send(Op::Settle(op)) {
            Ok(()) => {
                if self.answer(tenant, "settle", answer).await.is_some() {
                    // Known now, not only at the next admission's read: a
                    // Redis that stops answering before then finds it.
                    self.count_spend(tenant, request.period_id, request.usage.cost_pusd);
                }
            }
            Err(mpsc::error::SendError(Op::Settle(op))) => {
                self.inner.shared.failed(
                    Some(tenant),
                    "settle",
                    "the Redis batching task has stopped",
                );
                self.inner
                    .shared
                    .defer(op.tenant, &op.period_id, op.lease, &op.usage);
            }
            Err(_) => {}
        }
    }

    /// Adds `cost` pUSD to the spend last read from Redis, when it is of
    /// period `period_id`.
    fn count_spend(&self, tenant: usize, period_id: &str, cost: i64) {
        let mut known = lock(&self.inner.known_spend[tenant]);
        if known.0 == period_id {
            known.1 = known.1.saturating_add(cost);
        }
    }

    /// This instance's requests of `tenant` in flight that Redis admitted
    /// with a concurrency slot (the in-process store counts them while
    /// Redis is unavailable).
    pub fn leases_of(&self, tenant: usize) -> u32 {
        self.held_leases(tenant).len() as u32
    }

    /// The leases of `tenant` this instance holds.
    fn held_leases(&self, tenant: usize) -> Vec<Lease> {
        let leases = lock(&self.inner.leases);
        (leases.iter())
            .filter(|&(_, &t)| t == tenant)
            .map(|(lease, _)| *lease)
            .collect()
    }

    /// A request that ended without settling (its task panicked): its lease
    /// is no longer renewed and is released by the next flush.
    pub fn abandon_lease(&self, tenant: usize, lease: Lease) {
        lock(&self.inner.leases).remove(&lease);
        lock(&self.inner.shared.ledger)
            .unreleased
            .push((tenant, lease));
    }

    /// The last spend read from Redis plus what this instance owes it: the
    /// budget check's view while Redis is unavailable.
    pub fn known_spend(&self, tenant: usize, period_id: &str) -> i64 {
        let known = {
            let known = lock(&self.inner.known_spend[tenant]);
            if known.0 == period_id {
                known.1
            } else {
                0
            }
        };
        known + lock(&self.inner.shared.ledger).owed_spend(tenant, period_id)
    }

    /// Counts `spent` pUSD of period `period_id` as the tenant's known
    /// spend, unless more is known already: a reload's predecessor's
    /// figure, good until Redis is read.
    pub fn count_known_spend(&self, tenant: usize, period_id: &str, spent: i64) {
        let spent = spent.max(0);
        let mut known = lock(&self.inner.known_spend[tenant]);
        if known.0 != period_id {
            *known = (period_id.to_string(), spent);
        } else {
            known.1 = known.1.max(spent);
        }
    }

    /// The period's usage: Redis's counters plus what is pending here.
    /// The flag says Redis could not be read.
    pub async fn usage(&self, tenant: usize, period_id: &str) -> (PeriodUsage, bool) {
        let mut usage = {
            let ledger = lock(&self.inner.shared.ledger);
            let mut usage = (ledger.pending.get(tenant, period_id))
                .cloned()
                .unwrap_or_default();
            let down = !self.tenant_up(tenant);
            for unsettled in &ledger.unsettled {
                // Up, Redis counts what it was sent (a batch it did not
                // answer may have counted); what was never sent is this
                // instance's to add (`redis.lease` owes as it goes).
                if unsettled.tenant == tenant
                    && unsettled.period_id == period_id
                    && (down || !unsettled.uncertain)
                {
                    usage.add(&unsettled.usage);
                }
            }
            if down {
                for debt in &ledger.adopted {
                    if debt.tenant == Some(tenant) && debt.owed.period == period_id {
                        usage.cost_pusd += debt.owed.cost_pusd;
                    }
                }
            }
            usage
        };
        if !self.tenant_up(tenant) {
            return (usage, true);
        }
        let key = self.inner.keys[tenant].usage(period_id);
        type Counters = (
            Option<u64>,
            Option<u64>,
            Option<u64>,
            Option<i64>,
            Option<u64>,
            Option<u64>,
            Option<i64>,
        );
        let read: Option<Counters> = self
            .call(Some(tenant), "usage", |mut conn| async move {
                redis::cmd("HMGET")
                    .arg(&key)
                    .arg(&[
                        "requests",
                        "prompt_tokens",
                        "completion_tokens",
                        "cost_pusd",
                        "estimated_requests",
                        "cache_hits",
                        "cache_saved_pusd",
                    ])
                    .query_async(&mut conn)
                    .await
            })
            .await;
        match read {
            Some((requests, prompt, completion, cost, estimated, hits, saved)) => {
                usage.add(&PeriodUsage {
                    requests: requests.unwrap_or(0),
                    prompt_tokens: prompt.unwrap_or(0),
                    completion_tokens: completion.unwrap_or(0),
                    cost_pusd: cost.unwrap_or(0),
                    estimated_requests: estimated.unwrap_or(0),
                    cache_hits: hits.unwrap_or(0),
                    cache_saved_pusd: saved.unwrap_or(0),
                });
                (usage, false)
            }
            None => (usage, true),
        }
    }

    /// Connects at start-up, so the first requests find Redis ready: a
    /// PING given longer than a call (TLS, a cluster's slot map, the
    /// sentinels' answer take a moment). Redis is marked down if it does not
    /// answer.
    pub async fn connect(&self) {
        let Some(mut conn) = self.connection() else {
            return;
        };
        let ping = tokio::time::timeout(
            WARM_UP,
            redis::cmd("PING").query_async::<redis::Value>(&mut conn),
        )
        .await;
        match ping {
            Ok(Ok(_)) => {
                // Every tenant's keys are probed, as after an outage: on a
                // cluster a primary may be down while PING answers.
                if self.probe_tenants(WARM_UP).await {
                    info!("Redis answers");
                } else {
                    // A cluster primary down: its tenants wait for the probe.
                    warn!("Redis answers for some tenants only; the others are in-process until it does");
                }
            }
            Ok(Err(e)) => {
                warn!(error = %crate::redis_conn::scrub(&e.to_string()), "Redis does not answer at start-up; limits stay in-process until it does");
                self.inner.shared.failed(None, "connect", "start-up");
            }
            Err(_) => {
                warn!("Redis did not answer within {WARM_UP:?} at start-up; limits stay in-process until it does");
                self.inner.shared.failed(None, "connect", "start-up");
            }
        }
    }

    /// Probes the tenants whose keys did not answer; marks each up when a
    /// call on its keys answers (a PING proves nothing about a cluster's
    /// slots). Whether every tenant is up afterwards.
    async fn probe_tenants(&self, bound: Duration) -> bool {
        let Some(conn) = self.connection() else {
            return false;
        };
        let down: Vec<usize> = (0..self.inner.keys.len())
            .filter(|&t| !self.inner.shared.is_up(t))
            .collect();
        let probes = down.iter().map(|&tenant| {
            let mut conn = conn.clone();
            let key = self.inner.keys[tenant].rate.clone();
            async move {
                let mut exists = redis::cmd("EXISTS");
                exists.arg(key);
                let answered =
                    tokio::time::timeout(bound, exists.query_async::<i64>(&mut conn)).await;
                (tenant, matches!(answered, Ok(Ok(_))))
            }
        });
        for (tenant, answered) in futures_util::future::join_all(probes).await {
            let answered = answered && self.restore_leases(tenant).await;
            if answered && self.inner.shared.recovered(Some(tenant)) && !down.is_empty() {
                // Every operation's error count starts at 0, so rates work at once.
                for op in [
                    "admit", "settle", "usage", "flush", "renew", "overflow", "connect",
                ] {
                    metrics::REDIS_ERRORS.with_label_values(&[op]);
                }
            }
        }
        self.inner.shared.all_up()
    }

    /// Probes the tenants Redis did not answer for.
    async fn probe(&self) {
        if self.probe_tenants(self.inner.timeout).await {
            info!("Redis is back; limits are shared again");
        }
    }

    /// Pays what this instance owes Redis for the tenants it answers for:
    /// usage recorded while it was down, batches whose answer never came
    /// (each under its own number, so one Redis did apply counts once),
    /// leases to release, and what ended processes left owing. What is
    /// owed is written down first, numbered, when the process keeps its
    /// debts beside its pid file.
    async fn flush_pending(&self) {
        let up = |tenant: usize| self.tenant_up(tenant);
        let (batches, unreleased, adopted): (Vec<Unsettled>, Vec<_>, Vec<Debt>) = {
            let mut ledger = lock(&self.inner.shared.ledger);
            ledger.number_pending(&self.inner.keys);
            // What a tenant still down owes stays for a later flush.
            let (batches, kept) = std::mem::take(&mut ledger.unsettled)
                .into_iter()
                .partition(|batch| up(batch.tenant));
            ledger.unsettled = kept;
            let (unreleased, kept) = std::mem::take(&mut ledger.unreleased)
                .into_iter()
                .partition(|(tenant, _)| up(*tenant));
            ledger.unreleased = kept;
            let (adopted, kept) = std::mem::take(&mut ledger.adopted)
                .into_iter()
                .partition(|debt| debt.tenant.map_or_else(|| self.is_up(), up));
            ledger.adopted = kept;
            // Still owed while they are out, and written down as such.
            ledger.sending.clone_from(&batches);
            ledger.paying.clone_from(&adopted);
            (batches, unreleased, adopted)
        };
        if batches.is_empty() && unreleased.is_empty() && adopted.is_empty() {
            return;
        }
        // Numbered before they are written down, written down before they
        // are sent: a batch only ever goes under its number.
        self.keep_debts();
        // One call per tenant (on a cluster, its keys' primary), all at
        // once: a primary that does not answer takes down only its tenants.
        let mut parts: std::collections::BTreeMap<Option<usize>, Part> = Default::default();
        for batch in batches {
            parts
                .entry(Some(batch.tenant))
                .or_default()
                .batches
                .push(batch);
        }
        for debt in adopted {
            parts.entry(debt.tenant).or_default().adopted.push(debt);
        }
        for (tenant, lease) in unreleased {
            let part = parts.entry(Some(tenant)).or_default();
            part.unreleased.push((tenant, lease));
        }
        let flushes = (parts.into_iter()).map(|(tenant, part)| self.flush_part(tenant, part));
        let flushed = futures_util::future::join_all(flushes).await;
        let (applied, paid) =
            (flushed.iter()).fold((0, 0), |(a, p), f| (a + f.applied, p + f.paid));
        // Said for what an outage or an ended process left, not for what
        // `redis.lease` owes as it goes.
        if flushed.iter().any(|f| f.after_outage) || paid > 0 {
            info!(
                batches = applied,
                debts_of_ended_processes = paid,
                "flushed usage and lease releases recorded while Redis was unavailable"
            );
        }
        self.keep_debts();
        if flushed.iter().any(|f| f.unknown_script) {
            let settle = &self.inner.settle;
            let _: Option<String> = self
                .call(None, "flush", |mut conn| async move {
                    settle.load_async(&mut conn).await
                })
                .await;
        }
    }

    /// Sends one tenant's part of a flush (`None`: debts of tenants this
    /// config does not name) and files the answers.
    async fn flush_part(&self, tenant: Option<usize>, part: Part) -> Flushed {
        let Part {
            batches,
            unreleased,
            adopted,
        } = part;
        // By hash: with `redis.lease` this runs every quarter lease, and
        // the script (4 KB) is sent only when Redis does not know it.
        let mut commands: Vec<(usize, redis::Cmd)> = batches
            .iter()
            .map(|batch| {
                let keys = &self.inner.keys[batch.tenant];
                (batch.tenant, batch.command(keys, &self.inner.settle, true))
            })
            .collect();
        commands.extend(adopted.iter().map(|debt| (0, debt.command())));
        for (tenant, lease) in &unreleased {
            let mut zrem = redis::cmd("ZREM");
            zrem.arg(&self.inner.keys[*tenant].inflight).arg(lease);
            commands.push((*tenant, zrem));
        }
        let commands = &commands;
        let results: Option<Vec<RedisResult<redis::Value>>> = self
            .call(tenant, "flush", |conn| async move {
                conn.pipeline(commands).await
            })
            .await;
        let no_script = redis::ErrorKind::Server(redis::ServerErrorKind::NoScript);
        let mut flushed = Flushed::default();
        let mut ledger = lock(&self.inner.shared.ledger);
        // No longer out: what comes back below is owed again.
        let numbers: Vec<u64> = batches.iter().map(|b| b.batch).collect();
        ledger
            .sending
            .retain(|u| Some(u.tenant) != tenant || !numbers.contains(&u.batch));
        ledger.paying.retain(|d| d.tenant != tenant);
        match results {
            Some(results) if results.len() == commands.len() => {
                let mut results = results.into_iter();
                for batch in batches {
                    match results.next() {
                        Some(Ok(_)) => {
                            flushed.applied += 1;
                            flushed.after_outage |= ledger.outage.remove(&batch.tenant);
                            ledger.applied(batch.tenant, &batch.period_id);
                            // No longer owed: counted as Redis's own until
                            // the next read says so.
                            let cost = batch.usage.cost_pusd;
                            self.count_spend(batch.tenant, &batch.period_id, cost);
                        }
                        Some(Err(e)) if ledger::refused(&e) => {
                            ledger.refuse(batch, "flush", &e.to_string());
                        }
                        // Not run (Redis restarted, or a replica took
                        // over): sent again as it is once loaded.
                        Some(Err(e)) if e.kind() == no_script => {
                            flushed.unknown_script = true;
                            ledger.unsettled.push(batch);
                        }
                        _ => ledger.unanswered(batch),
                    }
                }
                for mut debt in adopted {
                    match results.next() {
                        Some(Ok(_)) => flushed.paid += 1,
                        // Sent again until Redis takes it, as the process
                        // that owed it would have; said once.
                        Some(Err(e)) => {
                            metrics::REDIS_ERRORS.with_label_values(&["flush"]).inc();
                            if !std::mem::replace(&mut debt.refused, true) {
                                warn!(tenant = %debt.owed.tenant, period = %debt.owed.period, error = %crate::redis_conn::scrub(&e.to_string()), "Redis refuses a debt an ended process left; it is kept and sent again until Redis takes it");
                            }
                            ledger.adopted.push(debt);
                        }
                        None => ledger.adopted.push(debt),
                    }
                }
                for lease in unreleased {
                    if !matches!(results.next(), Some(Ok(_))) {
                        ledger.unreleased.push(lease);
                    }
                }
            }
            _ => {
                // Kept with their numbers: sent again by the next flush
                // (Redis may have applied them).
                for batch in batches {
                    ledger.unanswered(batch);
                }
                ledger.adopted.extend(adopted);
                ledger.unreleased.extend(unreleased);
            }
        }
        flushed
    }

    /// Writes down what this process owes (see [`DebtFile::keep`]), when
    /// it keeps its debts: its own batches as the calls that pay them, and
    /// the debts it took over. Whether the file says so now.
    fn keep_debts(&self) -> bool {
        let Some(debts) = self.inner.debts.get() else {
            return true;
        };
        debts.keep(|| {
            // Copied under the ledger's lock, written out of it.
            let (own, adopted) = {
                let ledger = lock(&self.inner.shared.ledger);
                let own: Vec<Unsettled> =
                    (ledger.unsettled.iter().chain(&ledger.sending).cloned()).collect();
                let adopted: Vec<Debt> =
                    (ledger.adopted.iter().chain(&ledger.paying).cloned()).collect();
                (own, adopted)
            };
            let own = own.iter().map(|batch| {
                let keys = &self.inner.keys[batch.tenant];
                let call = batch.command(keys, &self.inner.settle, false);
                // EVAL, the script, the number of keys, the keys, the arguments.
                let mut args = call.args_iter().skip(2).map(|arg| match arg {
                    redis::Arg::Simple(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                    _ => String::new(),
                });
                let count = args.next().and_then(|n| n.parse().ok()).unwrap_or(0);
                let keys = args.by_ref().take(count).collect();
                let written = Written {
                    tenant: self.inner.ids[batch.tenant].clone(),
                    period: batch.period_id.clone(),
                    cost_pusd: batch.usage.cost_pusd,
                    script: 0,
                    keys,
                    args: args.collect(),
                };
                (self.inner.settle_text.clone(), written)
            });
            let adopted = adopted.into_iter().map(|debt| (debt.script, debt.owed));
            own.chain(adopted).collect()
        })
    }

    /// Writes down what is owed as it comes to be owed: within a twentieth
    /// of a second of a settlement kept for the flush (at most twenty
    /// writes a second), and every probe interval, whatever Redis's calls
    /// wait for meanwhile (a frozen Redis holds a probe for its whole
    /// timeout); and once more when the task is dropped, as the runtime
    /// stops at the end of the process (a grace period over), so what
    /// requests ending just before then owe is written too. Runs until
    /// aborted; only when the process keeps its debts.
    pub(super) async fn write_down_as_owed(self) {
        if self.inner.debts.get().is_none() {
            return;
        }
        let last = WriteAtTheEnd(self);
        loop {
            let deferred = last.0.inner.shared.deferred.notified();
            tokio::select! {
                _ = tokio::time::sleep(PROBE_EVERY) => {}
                _ = deferred => {}
            }
            last.0.write_down();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Numbers what is pending and writes down all that is owed.
    fn write_down(&self) {
        lock(&self.inner.shared.ledger).number_pending(&self.inner.keys);
        self.keep_debts();
    }

    /// Keeps what this process owes Redis written down beside `pid_file`
    /// while it owes anything (the gateway's process, not a library user),
    /// and has it take over what ended processes on the same pid file left
    /// owing ([`RedisStore::take_over_debts`]).
    pub fn keep_debts_beside(&self, pid_file: &str) {
        let _ = self.inner.debts.set(DebtFile::beside(pid_file));
    }

    /// Takes over what processes on the same pid file that have ended left
    /// owing Redis (a gateway stopped, reloaded or killed while Redis did
    /// not answer): written into this process's own debt file, their files
    /// removed, and paid by the flush once Redis answers (their batches
    /// under their numbers, so what Redis already applied counts once).
    pub(super) fn take_over_debts(&self) {
        let Some(debts) = self.inner.debts.get() else {
            return;
        };
        let found = debts.left_by_others(&self.inner.ids);
        if found.is_empty() {
            return;
        }
        let before = {
            let mut ledger = lock(&self.inner.shared.ledger);
            let before = ledger.adopted.len();
            for (_, taken) in &found {
                ledger.adopted.extend(taken.iter().cloned());
            }
            before
        };
        if !self.keep_debts() {
            // Left in their files for a later try (or another process).
            lock(&self.inner.shared.ledger).adopted.truncate(before);
            return;
        }
        let usd: i64 = (found.iter())
            .flat_map(|(_, taken)| taken.iter().map(|d| d.owed.cost_pusd))
            .sum();
        for (path, _) in &found {
            let _ = std::fs::remove_file(path);
        }
        info!(
            files = found.len(),
            owed_usd = usd as f64 / 1e12,
            "took over what ended processes owed Redis; paid once it answers"
        );
    }

    /// What this instance owes Redis and has not paid (pUSD): usage
    /// recorded while it was down, batches whose answer never came, and
    /// what it took over from ended processes.
    fn owed(&self) -> Option<i64> {
        let ledger = lock(&self.inner.shared.ledger);
        let pending = ledger.pending.iter().map(|(_, _, usage)| usage.cost_pusd);
        let unsettled = ledger.unsettled.iter().map(|batch| batch.usage.cost_pusd);
        let adopted = ledger.adopted.iter().map(|debt| debt.owed.cost_pusd);
        let owes = !ledger.pending.is_empty()
            || !ledger.unsettled.is_empty()
            || !ledger.adopted.is_empty();
        owes.then(|| pending.chain(unsettled).chain(adopted).sum())
    }

    /// Says, as the process begins to stop, what it owes Redis and what
    /// becomes of it: the upkeep goes on paying it while the process
    /// drains (Redis may answer before it ends), and what is still owed at
    /// its end is left written down for the next process on the pid file
    /// (lost when the process keeps no debts).
    /// Whether anything was owed.
    pub(super) fn say_what_is_owed_at_stop(&self) -> bool {
        let Some(owed) = self.owed() else {
            return false;
        };
        let owed_usd = owed as f64 / 1e12;
        let kept = match self.inner.debts.get() {
            Some(debts) if debts.is_written() => {
                "it is left beside the pid file for the next process on it"
            }
            Some(_) => "it cannot be written down beside the pid file: lost",
            None => "lost",
        };
        if self.is_up() {
            warn!(owed_usd, if_not = kept, "stopping while Redis refuses some of the usage owed to it: paid if it takes it before this process ends");
        } else {
            warn!(owed_usd, if_not = kept, "stopping while Redis does not answer: the usage owed to it is paid if it answers before this process ends");
        }
        true
    }

    /// Whether this instance owes Redis nothing.
    pub(super) fn owes_nothing(&self) -> bool {
        self.owed().is_none()
    }

    /// Gives Redis back what the pools have held unused for
    /// `redis.lease.ms` (all of it once stopping, or for a tenant Redis
    /// does not answer for): holds released (what of them was used is
    /// charged), what no hold holds to the tenant's minutes, the slots
    /// released with the flush. A release Redis does not answer is sent
    /// again with the next upkeep: Redis releases a hold once.
    async fn give_back_unused(&self) {
        let Some(pools) = &self.inner.pools else {
            return;
        };
        let unused = pools.unused(pool::now(), |tenant| self.tenant_up(tenant));
        if unused.is_empty() {
            return;
        }
        let mut settled = Vec::new();
        let mut released = Vec::new();
        for pool::Unused {
            tenant,
            requests,
            tokens,
            releases,
            slots,
        } in unused
        {
            let mut ledger = lock(&self.inner.shared.ledger);
            ledger
                .unreleased
                .extend(slots.into_iter().map(|slot| (tenant, slot)));
            drop(ledger);
            let Some(queue) = self.tenant_up(tenant).then(|| self.queue()).flatten() else {
                // Quota Redis does not hear of comes back with its minute;
                // a hold it keeps is released once Redis answers, or
                // counted as used whole at its expiry.
                pools.release_again(tenant, releases);
                continue;
            };
            let limits = &pools.limits[tenant];
            let (rpm, tpm) = (
                u64::from(limits.requests_per_minute.unwrap_or(0)),
                limits.tokens_per_minute.unwrap_or(0),
            );
            let (period_id, _) =
                super::period::period_at(super::period::accounting_period(limits), super::now_ms());
            for (hold, back) in releases {
                let (reply, answer) = oneshot::channel();
                let op = AdmitOp {
                    tenant,
                    period_id: period_id.clone(),
                    limits: [rpm, tpm, 0, 0, 0, 0, 0, 0],
                    tokens: None,
                    lease: None,
                    kept: false,
                    extra: [0, 0],
                    back,
                    release: Some(hold),
                    hold: None,
                    reply,
                };
                if queue.send(Op::Admit(op)).is_ok() {
                    released.push((tenant, (hold, back), answer));
                }
            }
            if requests == 0 && tokens == 0 {
                continue;
            }
            let (reply, answer) = oneshot::channel();
            let op = SettleOp {
                tenant,
                period_id,
                rpm,
                tpm,
                request_delta: -requests,
                token_delta: -tokens,
                lease: None,
                usage: PeriodUsage::default(),
                reply,
            };
            if queue.send(Op::Settle(op)).is_ok() {
                settled.push((tenant, answer));
            }
        }
        // One round trip for all of them (the batching task groups them),
        // and the slots' release in the flush's.
        for (tenant, release, answer) in released {
            if self.answer(tenant, "admit", answer).await.is_none() {
                pools.release_again(tenant, vec![release]);
            }
        }
        for (tenant, answer) in settled {
            self.answer(tenant, "settle", answer).await;
        }
    }

    /// The pools' upkeep, every [`Pools::tick`]: what they held unused
    /// goes back, and what their settlements owe is sent.
    async fn pool_upkeep(&self) {
        self.give_back_unused().await;
        self.flush_pending().await;
    }

    /// Stops taking quota ahead (the process is stopping): what the pools
    /// hold is given back, and the requests still running settle as
    /// without `redis.lease`.
    async fn stop_pooling(&self) {
        if let Some(pools) = &self.inner.pools {
            pools.stop();
            self.pool_upkeep().await;
        }
    }

    /// How often the pools are looked at for quota to give back, with
    /// `redis.lease`.
    fn pool_tick(&self) -> Option<Duration> {
        self.inner.pools.as_ref().map(Pools::tick)
    }

    /// Extends the leases this instance holds.
    async fn renew_leases(&self) {
        let mut by_tenant: HashMap<usize, Vec<Lease>> = HashMap::new();
        for (lease, tenant) in lock(&self.inner.leases).iter() {
            by_tenant.entry(*tenant).or_default().push(*lease);
        }
        if let Some(pools) = &self.inner.pools {
            for tenant in 0..self.inner.keys.len() {
                let kept = pools.slots(tenant);
                if !kept.is_empty() {
                    by_tenant.entry(tenant).or_default().extend(kept);
                }
            }
        }
        for (tenant, leases) in by_tenant {
            if !self.tenant_up(tenant) {
                continue;
            }
            let lost = self.renew(tenant, &leases, "XX").await;
            // A kept slot Redis lost (a failover to a replica that had not
            // seen it, the key deleted) is not used again: Redis would not
            // count its requests.
            if let (Some(pools), Some(lost)) = (&self.inner.pools, lost) {
                pools.forget(tenant, &lost);
            }
        }
    }

    /// Renews `leases` of `tenant` (`mode` as [`scripts::RENEW`] takes it):
    /// those Redis did not hold (with `XX`), or `None` when it did not
    /// answer.
    async fn renew(
        &self,
        tenant: usize,
        leases: &[Lease],
        mode: &'static str,
    ) -> Option<Vec<Lease>> {
        let key = &self.inner.keys[tenant].inflight;
        let lost: Vec<usize> = self
            .call(Some(tenant), "renew", |mut conn| async move {
                let mut invocation = self.inner.renew.key(key);
                invocation.arg(LEASE_TTL_MS).arg(mode);
                for lease in leases {
                    invocation.arg(lease);
                }
                invocation.invoke_async(&mut conn).await
            })
            .await?;
        Some(
            lost.into_iter()
                .filter_map(|at| leases.get(at.checked_sub(1)?).copied())
                .collect(),
        )
    }

    /// Puts back the leases of `tenant` this instance still holds, before
    /// the tenant counts as up again: an outage longer than their TTL let
    /// Redis expire them (its clock ran on), and the slots must not be
    /// given out twice. Whether Redis took them.
    async fn restore_leases(&self, tenant: usize) -> bool {
        let leases = self.held_leases(tenant);
        leases.is_empty() || self.renew(tenant, &leases, "").await.is_some()
    }
}

/// One tenant's part of a flush: what it owes, and what it sends for it.
#[derive(Default)]
struct Part {
    batches: Vec<Unsettled>,
    unreleased: Vec<(usize, Lease)>,
    adopted: Vec<Debt>,
}

/// What one part of a flush did.
#[derive(Default)]
struct Flushed {
    applied: usize,
    paid: usize,
    /// A batch kept through an outage was applied.
    after_outage: bool,
    /// Redis did not know `SETTLE` (restarted, or a replica took over).
    unknown_script: bool,
}

/// Writes down what is owed when dropped (see
/// [`RedisStore::write_down_as_owed`]).
struct WriteAtTheEnd(RedisStore);

impl Drop for WriteAtTheEnd {
    fn drop(&mut self) {
        self.0.write_down();
    }
}

/// Connects the batching task's own connection: `Some` once it answers a
/// `PING` (a few tries, a second apart), `None` when it never does (the
/// task goes on with the shared one, which the maintenance keeps probing).
async fn warm_up(mut own: Conn) -> Option<Conn> {
    for _ in 0..5 {
        let ping = redis::cmd("PING");
        let answer = ping.query_async::<redis::Value>(&mut own);
        if let Ok(Ok(_)) = tokio::time::timeout(WARM_UP, answer).await {
            return Some(own);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::Lease;

    #[test]
    fn a_lease_is_written_as_32_lowercase_hex_digits() {
        for id in [0, 1, 0xabc, u128::MAX, u128::MAX / 3, 1 << 127] {
            let written = Lease(id.to_be_bytes()).hex();
            assert_eq!(std::str::from_utf8(&written), Ok(&*format!("{id:032x}")));
        }
        let args = redis::ToRedisArgs::to_redis_args(&Lease(0xabc_u128.to_be_bytes()));
        assert_eq!(args, [format!("{:032x}", 0xabc).into_bytes()]);
        assert_ne!(Lease::random(), Lease::random());
    }
}
