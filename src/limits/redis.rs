//! The Redis limit store: limits and spend shared by every gateway instance
//! that uses the same Redis.
//!
//! Keys of one tenant share a hash tag so Redis Cluster keeps them on one
//! slot: `{prefix}:{tenant}:rate` (hash: the two GCRA TATs),
//! `{prefix}:{tenant}:inflight` (sorted set: concurrency leases scored by
//! expiry), `{prefix}:{tenant}:usage:{period}` (hash: requests, tokens,
//! spend). Admissions and settlements are group-committed by a [`Batcher`]:
//! those queued while a round trip is out go together in the next, one
//! `EVALSHA` of [`ADMIT`] or [`SETTLE`] per tenant and period, all in one
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
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

/// How long a concurrency lease lives without renewal.
pub const LEASE_TTL_MS: u64 = 30_000;

/// How often held leases are renewed.
const RENEW_EVERY: Duration = Duration::from_millis(LEASE_TTL_MS / 3);

/// How often a down Redis is probed, and pending spend flushed.
const PROBE_EVERY: Duration = Duration::from_millis(500);

/// Admissions of one tenant in one period, decided in order, each all or
/// nothing. ARGV: rpm, tpm, max concurrent, budget (pUSD), lease TTL, then
/// (tokens, lease) per admission. Replies `{secs, micros, spent_pusd}` (the
/// Redis clock, as `TIME` gives it) followed by `{refused_limit_or_empty,
/// requests_tat - now, tokens_tat - now}` per admission, the differences in
/// whole microseconds: integers, so nothing is formatted per admission (Lua's
/// `tostring` keeps only 14 digits, too few for timestamps).
const ADMIT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local W, eps = 60000, 1e-6
local rpm, tpm, maxc, budget, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local tats = redis.call('HMGET', KEYS[1], 'requests_tat', 'tokens_tat')
local rtat, ttat = tonumber(tats[1] or '0'), tonumber(tats[2] or '0')
local spent = tonumber(redis.call('HGET', KEYS[3], 'cost_pusd') or '0')
local held = 0
if maxc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  held = redis.call('ZCARD', KEYS[2])
end
local reply, leases, moved = {t[1], t[2], spent}, {}, false
for i = 6, #ARGV, 2 do
  local tokens, refused = tonumber(ARGV[i]), ''
  local new_r, new_t = rtat, ttat
  if budget > 0 and spent >= budget then refused = 'budget' end
  if refused == '' and rpm > 0 then
    new_r = math.max(rtat, now) + W / rpm
    if new_r - now - W > eps then refused = 'rpm' end
  end
  if refused == '' and tpm > 0 then
    new_t = math.max(ttat, now) + tokens * W / tpm
    if new_t - now - W > eps then refused = 'tpm' end
  end
  if refused == '' and maxc > 0 and held >= maxc then refused = 'concurrency' end
  if refused == '' then
    moved = moved or rpm > 0 or tpm > 0
    rtat, ttat = new_r, new_t
    if maxc > 0 then
      held = held + 1
      leases[#leases + 1] = now + ttl
      leases[#leases + 1] = ARGV[i + 1]
    end
  end
  reply[#reply + 1] = refused
  reply[#reply + 1] = math.floor((rtat - now) * 1000)
  reply[#reply + 1] = math.floor((ttat - now) * 1000)
end
if #leases > 0 then
  redis.call('ZADD', KEYS[2], unpack(leases))
  redis.call('PEXPIRE', KEYS[2], ttl * 2)
end
if moved then
  redis.call('HSET', KEYS[1], 'requests_tat', string.format('%.6f', rtat), 'tokens_tat', string.format('%.6f', ttat))
  redis.call('PEXPIRE', KEYS[1], 2 * W)
end
return reply
";

/// A batch of settlements of one tenant in one period, applied at most
/// once: Redis records the batch id in `KEYS[4]` (a sorted set scored by
/// expiry) and a batch it has seen is not applied again, so a batch sent
/// again after its answer timed out (a frozen Redis runs the original when it
/// thaws) counts once. ARGV: rpm, tpm, usage TTL (seconds, 0 to keep), batch
/// id, id TTL (ms), the summed requests, prompt tokens, completion tokens and
/// cost (pUSD), the number k of limit corrections, k pairs (request delta,
/// token delta) in order, then the leases to release. Replies 1 when
/// applied, 0 for a batch already applied.
const SETTLE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
if redis.call('ZADD', KEYS[4], 'NX', now + tonumber(ARGV[5]), ARGV[4]) == 0 then return 0 end
redis.call('PEXPIRE', KEYS[4], tonumber(ARGV[5]))
local rpm, tpm, ttl, k = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[10])
local function shift(tat, step)
  if step > 0 then return math.max(tat, now) + step end
  return math.max(tat + step, now)
end
if k > 0 and (rpm > 0 or tpm > 0) then
  local tats = redis.call('HMGET', KEYS[1], 'requests_tat', 'tokens_tat')
  local rtat, ttat = tonumber(tats[1] or '0'), tonumber(tats[2] or '0')
  for i = 11, 9 + 2 * k, 2 do
    local rd, td = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
    if rpm > 0 and rd ~= 0 then rtat = shift(rtat, rd * 60000 / rpm) end
    if tpm > 0 and td ~= 0 then ttat = shift(ttat, td * 60000 / tpm) end
  end
  redis.call('HSET', KEYS[1], 'requests_tat', string.format('%.6f', rtat), 'tokens_tat', string.format('%.6f', ttat))
  redis.call('PEXPIRE', KEYS[1], 120000)
end
if #ARGV > 10 + 2 * k then redis.call('ZREM', KEYS[2], unpack(ARGV, 11 + 2 * k)) end
if tonumber(ARGV[6]) > 0 or tonumber(ARGV[9]) ~= 0 or tonumber(ARGV[7]) > 0 or tonumber(ARGV[8]) > 0 then
  redis.call('HINCRBY', KEYS[3], 'requests', ARGV[6])
  redis.call('HINCRBY', KEYS[3], 'prompt_tokens', ARGV[7])
  redis.call('HINCRBY', KEYS[3], 'completion_tokens', ARGV[8])
  redis.call('HINCRBY', KEYS[3], 'cost_pusd', ARGV[9])
  if ttl > 0 then redis.call('EXPIRE', KEYS[3], ttl) end
end
return 1
";

/// How long Redis remembers a settlement batch it applied. Counted from
/// when it applied it: a frozen Redis runs the original when it thaws, and
/// the flush sends the copy within a probe interval of that, so minutes
/// are ample. Entries are per round trip, not per request (a batch carries
/// every settlement that waited together), which bounds their memory.
const SETTLED_TTL_MS: u64 = 600_000;

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
    /// Settlement batches applied recently (sorted set by expiry).
    settled: String,
}

impl Keys {
    /// The usage hash of one period: `{prefix}:{tenant}:usage:{period}`.
    fn usage(&self, period_id: &str) -> String {
        format!("{}{period_id}", self.usage_prefix)
    }
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

/// The most admissions and settlements one round trip carries.
const MAX_BATCH: usize = 128;

/// Where the batching task sends one answer: the value, or why there is none.
type Reply<T> = oneshot::Sender<Result<T, String>>;

/// An admission or settlement waiting for the next round trip.
enum Op {
    Admit(AdmitOp),
    Settle(SettleOp),
}

/// One admission, as the batched [`ADMIT`] takes it.
struct AdmitOp {
    tenant: usize,
    period_id: String,
    /// RPM, TPM, max concurrent, budget (pUSD); 0 for none.
    limits: [u64; 4],
    tokens: u64,
    lease: String,
    reply: Reply<AdmitAnswer>,
}

/// Redis's decision on one admission.
struct AdmitAnswer {
    /// The refusing limit's label; empty when admitted.
    refused: String,
    /// Redis's clock, in Unix milliseconds.
    now: f64,
    requests_tat: f64,
    tokens_tat: f64,
    /// The period's spend when the batch was decided, in pUSD.
    spent: i64,
}

/// One settlement (or an unused grant's release), as the batched
/// [`SETTLE`] takes it.
struct SettleOp {
    tenant: usize,
    period_id: String,
    rpm: u64,
    tpm: u64,
    /// -1 to give the request back (an unused grant), else 0.
    request_delta: i64,
    token_delta: i64,
    /// Empty when the request held no Redis slot.
    lease: String,
    usage: PeriodUsage,
    reply: Reply<()>,
}

/// A settlement batch Redis may not have applied (its answer never came),
/// or usage it never got: sent by the flush, under the same id each time,
/// until Redis confirms it.
#[derive(Debug, Clone)]
struct Unsettled {
    id: String,
    tenant: usize,
    period_id: String,
    rpm: u64,
    tpm: u64,
    /// (request delta, token delta) per settlement, in order.
    corrections: Vec<(i64, i64)>,
    leases: Vec<String>,
    usage: PeriodUsage,
}

impl Unsettled {
    /// The batch for settlements that share a script call.
    fn from_ops(ops: &[SettleOp]) -> Self {
        let first = &ops[0];
        let mut usage = PeriodUsage::default();
        for op in ops {
            usage.add(&op.usage);
        }
        Unsettled {
            id: crate::ids::random_token(),
            tenant: first.tenant,
            period_id: first.period_id.clone(),
            rpm: first.rpm,
            tpm: first.tpm,
            corrections: ops
                .iter()
                .map(|op| (op.request_delta, op.token_delta))
                .filter(|&c| c != (0, 0))
                .collect(),
            leases: ops
                .iter()
                .filter(|op| !op.lease.is_empty())
                .map(|op| op.lease.clone())
                .collect(),
            usage,
        }
    }

    /// The [`SETTLE`] call for this batch: by hash (`EVALSHA`) on the hot
    /// path, whole (`EVAL`) from the flush, which may follow a Redis restart.
    fn command(&self, keys: &Keys, script: &Script, by_hash: bool) -> redis::Cmd {
        let mut cmd = if by_hash {
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(script.get_hash());
            cmd
        } else {
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(SETTLE);
            cmd
        };
        cmd.arg(4)
            .arg(&keys.rate)
            .arg(&keys.inflight)
            .arg(keys.usage(&self.period_id))
            .arg(&keys.settled)
            .arg(self.rpm)
            .arg(self.tpm)
            .arg(usage_ttl_seconds(&self.period_id))
            .arg(&self.id)
            .arg(SETTLED_TTL_MS)
            .arg(self.usage.requests)
            .arg(self.usage.prompt_tokens)
            .arg(self.usage.completion_tokens)
            .arg(self.usage.cost_pusd)
            .arg(self.corrections.len());
        for (requests, tokens) in &self.corrections {
            cmd.arg(requests).arg(tokens);
        }
        for lease in &self.leases {
            cmd.arg(lease);
        }
        cmd
    }
}

/// What this instance owes Redis: usage recorded while it was down, leases
/// to release, and settlement batches it may not have applied. Shared by
/// the store and its batching task; the flush pays it once Redis answers.
#[derive(Debug, Default)]
struct Ledger {
    /// Usage recorded while Redis was down, per (tenant, period): never
    /// sent, so it is given an id when the flush first sends it.
    pending: HashMap<(usize, String), PeriodUsage>,
    /// Leases whose release could not be sent (Redis down or frozen at
    /// settlement, an admission that timed out, a request that panicked),
    /// so a tenant does not lose those slots until the leases expire.
    unreleased: Vec<(usize, String)>,
    /// Batches sent whose answer never came: sent again under their id.
    unsettled: Vec<Unsettled>,
}

impl Ledger {
    /// Spend owed for a tenant's period (pending or unconfirmed), in pUSD.
    fn owed_spend(&self, tenant: usize, period_id: &str) -> i64 {
        let pending = self
            .pending
            .get(&(tenant, period_id.to_string()))
            .map_or(0, |u| u.cost_pusd);
        let unsettled: i64 = self
            .unsettled
            .iter()
            .filter(|u| u.tenant == tenant && u.period_id == period_id)
            .map(|u| u.usage.cost_pusd)
            .sum();
        pending + unsettled
    }
}

/// The store's state shared with its batching task.
#[derive(Debug)]
struct Shared {
    /// Whether Redis answered the last call.
    up: AtomicBool,
    ledger: Mutex<Ledger>,
}

impl Shared {
    /// Counts a failed call and marks the store down.
    fn failed(&self, op: &'static str, error: &str) {
        metrics::REDIS_ERRORS.with_label_values(&[op]).inc();
        if self.up.swap(false, Ordering::Relaxed) {
            metrics::REDIS_UP.set(0);
            warn!(op, error = %error, "Redis unavailable; limits fall back to in-process counters and spend is kept locally");
        }
    }

    /// Keeps a settlement that is not sent now for the flush: its usage
    /// summed per period, its lease to release.
    fn defer(&self, tenant: usize, period_id: &str, lease: &str, usage: &PeriodUsage) {
        let mut ledger = lock(&self.ledger);
        if !lease.is_empty() {
            ledger.unreleased.push((tenant, lease.to_string()));
        }
        if *usage != PeriodUsage::default() {
            ledger
                .pending
                .entry((tenant, period_id.to_string()))
                .or_default()
                .add(usage);
        }
    }
}

/// Adds `op` to the batch it shares a script call with, or starts one.
fn group<T>(batches: &mut Vec<Vec<T>>, op: T, same: impl Fn(&T, &T) -> bool) {
    match batches.iter_mut().find(|batch| same(&batch[0], &op)) {
        Some(batch) => batch.push(op),
        None => batches.push(vec![op]),
    }
}

/// Group commit for admissions and settlements. The ones queued while a
/// round trip is out go together in the next: one script call per kind,
/// tenant and period, all in one pipeline. Under load that is one round trip
/// and one script run for many requests; a request alone goes at once.
///
/// The task holds the connection and scripts, not the store, so it ends when
/// the store (the queue's sender) is dropped.
struct Batcher {
    conn: ConnectionManager,
    admit: Script,
    settle: Script,
    keys: Arc<[Keys]>,
    timeout: Duration,
    shared: Arc<Shared>,
}

impl Batcher {
    async fn run(self, mut queue: mpsc::UnboundedReceiver<Op>) {
        let mut ops = Vec::with_capacity(MAX_BATCH);
        while queue.recv_many(&mut ops, MAX_BATCH).await > 0 {
            self.send(ops.drain(..)).await;
        }
    }

    /// Sends one batch and answers every caller in it.
    async fn send(&self, ops: impl Iterator<Item = Op>) {
        let mut admits: Vec<Vec<AdmitOp>> = Vec::new();
        let mut settles: Vec<Vec<SettleOp>> = Vec::new();
        for op in ops {
            match op {
                // A caller that stopped waiting (timed out) has already
                // fallen back to the in-process store: it is not sent.
                Op::Admit(op) if !op.reply.is_closed() => group(&mut admits, op, |a, b| {
                    (a.tenant, &a.period_id, a.limits) == (b.tenant, &b.period_id, b.limits)
                }),
                Op::Admit(_) => {}
                // A settlement belongs to the store once queued: sent, or
                // kept for the flush while Redis is down.
                Op::Settle(op) if !self.shared.up.load(Ordering::Relaxed) => {
                    self.shared
                        .defer(op.tenant, &op.period_id, &op.lease, &op.usage);
                    let _ = op.reply.send(Ok(()));
                }
                Op::Settle(op) => group(&mut settles, op, |a, b| {
                    (a.tenant, &a.period_id, a.rpm, a.tpm) == (b.tenant, &b.period_id, b.rpm, b.tpm)
                }),
            }
        }
        let unsettled: Vec<Unsettled> = settles
            .iter()
            .map(|batch| Unsettled::from_ops(batch))
            .collect();
        let commands: Vec<redis::Cmd> = admits
            .iter()
            .map(|batch| self.admit_command(batch))
            .chain(
                unsettled
                    .iter()
                    .map(|u| u.command(&self.keys[u.tenant], &self.settle, true)),
            )
            .collect();
        if commands.is_empty() {
            return;
        }
        let results = match tokio::time::timeout(self.timeout, self.query(&commands)).await {
            Ok(Ok(results)) if results.len() == commands.len() => results,
            Ok(Ok(_)) => {
                let e = (redis::ErrorKind::Client, "a reply per command was expected").into();
                vec![Err(e); commands.len()]
            }
            Ok(Err(e)) => vec![Err(e); commands.len()],
            Err(_) => {
                let e = (redis::ErrorKind::Io, "no answer within the timeout").into();
                vec![Err(e); commands.len()]
            }
        };
        let mut results = results.into_iter();
        for batch in admits {
            let answers = results
                .next()
                .unwrap_or(Ok(redis::Value::Nil))
                .map_err(|e| e.to_string())
                .and_then(|value| admit_answers(value, batch.len()));
            match answers {
                Ok(answers) => {
                    for (op, answer) in batch.into_iter().zip(answers) {
                        let _ = op.reply.send(Ok(answer));
                    }
                }
                Err(e) => {
                    for op in batch {
                        let _ = op.reply.send(Err(e.clone()));
                    }
                }
            }
        }
        for (batch, unsettled) in settles.into_iter().zip(unsettled) {
            let result = match results.next() {
                Some(Ok(_)) => Ok(()),
                Some(Err(e)) => Err(e.to_string()),
                None => Err("no reply".to_string()),
            };
            if result.is_err() {
                // Redis may or may not have applied it: the flush sends it
                // again under the same id, and Redis counts it once.
                lock(&self.shared.ledger).unsettled.push(unsettled);
            }
            for op in batch {
                let _ = op.reply.send(result.clone());
            }
        }
    }

    /// Runs the commands in one pipeline, each with its own result. Scripts
    /// Redis does not know (it restarted) are loaded and only the commands
    /// that named them run again.
    async fn query(&self, commands: &[redis::Cmd]) -> RedisResult<Vec<RedisResult<redis::Value>>> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        for command in commands {
            pipe.add_command(command.clone());
        }
        let mut results: Vec<RedisResult<redis::Value>> =
            pipe.ignore_errors().query_async(&mut conn).await?;
        let no_script = |r: &RedisResult<redis::Value>| matches!(r, Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript));
        let again: Vec<usize> = (0..results.len())
            .filter(|&i| no_script(&results[i]))
            .collect();
        if !again.is_empty() {
            self.admit.load_async(&mut conn).await?;
            self.settle.load_async(&mut conn).await?;
            let mut pipe = redis::pipe();
            for &i in &again {
                pipe.add_command(commands[i].clone());
            }
            let retried: Vec<RedisResult<redis::Value>> =
                pipe.ignore_errors().query_async(&mut conn).await?;
            for (i, result) in again.into_iter().zip(retried) {
                results[i] = result;
            }
        }
        Ok(results)
    }

    /// One `EVALSHA` of [`ADMIT`] for admissions of one tenant and period.
    fn admit_command(&self, batch: &[AdmitOp]) -> redis::Cmd {
        let first = &batch[0];
        let keys = &self.keys[first.tenant];
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.admit.get_hash())
            .arg(3)
            .arg(&keys.rate)
            .arg(&keys.inflight)
            .arg(keys.usage(&first.period_id));
        cmd.arg(&first.limits[..]).arg(LEASE_TTL_MS);
        for op in batch {
            cmd.arg(op.tokens).arg(&op.lease);
        }
        cmd
    }
}

/// Reads [`ADMIT`]'s reply: `n` answers.
fn admit_answers(value: redis::Value, n: usize) -> Result<Vec<AdmitAnswer>, String> {
    let malformed = || format!("unexpected reply to the admission script: {value:?}");
    let items: Vec<redis::Value> = redis::from_redis_value_ref(&value).map_err(|_| malformed())?;
    if items.len() != 3 + 3 * n {
        return Err(malformed());
    }
    let number = |v: &redis::Value| redis::from_redis_value_ref::<f64>(v).map_err(|_| malformed());
    let now = number(&items[0])? * 1000.0 + number(&items[1])? / 1000.0;
    let spent = redis::from_redis_value_ref::<i64>(&items[2]).map_err(|_| malformed())?;
    items[3..]
        .chunks(3)
        .map(|answer| {
            Ok(AdmitAnswer {
                refused: redis::from_redis_value_ref(&answer[0]).map_err(|_| malformed())?,
                now,
                requests_tat: now + number(&answer[1])? / 1000.0,
                tokens_tat: now + number(&answer[2])? / 1000.0,
                spent,
            })
        })
        .collect()
}

struct Inner {
    conn: LazyConnection,
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
    /// Leases this instance holds: lease id -> tenant.
    leases: Mutex<HashMap<String, usize>>,
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One settlement as the limiter hands it to the store.
#[derive(Debug, Clone, Copy)]
pub struct SettleRequest<'a> {
    /// -1 to give the request back (an unused grant), else 0.
    pub request_delta: i64,
    /// Real tokens minus reserved ones (0 when Redis did not admit it).
    pub token_delta: i64,
    /// The Redis concurrency lease to release, if Redis admitted it.
    pub lease: Option<&'a str>,
    /// The period the usage counts in.
    pub period_id: &'a str,
    /// What the request used.
    pub usage: &'a PeriodUsage,
}

impl RedisStore {
    /// A store for these tenants; connects lazily, on first use.
    pub fn new(settings: &RedisSettings, tenants: &[TenantSettings]) -> Self {
        let keys: Arc<[Keys]> = tenants
            .iter()
            .map(|t| {
                let base = format!("{}:{{{}}}", settings.key_prefix, t.id);
                Keys {
                    rate: format!("{base}:rate"),
                    inflight: format!("{base}:inflight"),
                    usage_prefix: format!("{base}:usage:"),
                    settled: format!("{base}:settled"),
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
                shared: Arc::new(Shared {
                    up: AtomicBool::new(true),
                    ledger: Mutex::default(),
                }),
                batches: OnceLock::new(),
                renew: Script::new(RENEW),
                settle: Script::new(SETTLE),
                known_spend: tenants.iter().map(|_| Mutex::default()).collect(),
                leases: Mutex::default(),
            }),
        }
    }

    /// Whether Redis answered the last call.
    pub fn is_up(&self) -> bool {
        self.inner.shared.up.load(Ordering::Relaxed) && self.inner.conn.is_configured()
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
        self.inner.shared.failed(op, &error);
        None
    }

    /// The batching task's queue, started on first use.
    fn queue(&self) -> Option<&mpsc::UnboundedSender<Op>> {
        self.inner
            .batches
            .get_or_init(|| {
                let conn = self.connection()?;
                let (queue, ops) = mpsc::unbounded_channel();
                let batcher = Batcher {
                    conn,
                    admit: Script::new(ADMIT),
                    settle: self.inner.settle.clone(),
                    keys: self.inner.keys.clone(),
                    timeout: self.inner.timeout,
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
        op: &'static str,
        answer: oneshot::Receiver<Result<T, String>>,
    ) -> Option<T> {
        let error = match tokio::time::timeout(self.inner.timeout, answer).await {
            Ok(Ok(Ok(value))) => return Some(value),
            Ok(Ok(Err(e))) => e,
            Ok(Err(_)) => "the Redis batching task has stopped".to_string(),
            Err(_) => format!("no answer within {:?}", self.inner.timeout),
        };
        self.inner.shared.failed(op, &error);
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
        let queue = self.queue()?;
        let (reply, answer) = oneshot::channel();
        let op = Op::Admit(AdmitOp {
            tenant,
            period_id: period_id.to_string(),
            limits: [
                u64::from(limits.requests_per_minute.unwrap_or(0)),
                limits.tokens_per_minute.unwrap_or(0),
                u64::from(limits.max_concurrent.unwrap_or(0)),
                limits.budget.map_or(0, |b| b.amount_pusd.max(0) as u64),
            ],
            tokens,
            lease: lease.to_string(),
            reply,
        });
        let answer = match queue.send(op) {
            Ok(()) => self.answer("admit", answer).await,
            Err(_) => {
                self.inner
                    .shared
                    .failed("admit", "the Redis batching task has stopped");
                None
            }
        };
        let Some(AdmitAnswer {
            refused,
            now,
            requests_tat,
            tokens_tat,
            spent,
        }) = answer
        else {
            // An admission that timed out may still run once Redis answers
            // again (a frozen Redis reads it later) and take a slot nobody
            // holds: release it with the flush.
            if limits.max_concurrent.is_some() {
                lock(&self.inner.shared.ledger)
                    .unreleased
                    .push((tenant, lease.to_string()));
            }
            return None;
        };
        *lock(&self.inner.known_spend[tenant]) = (period_id.to_string(), spent);
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
    /// applied once (see [`SETTLE`]). From the moment it is handed over the
    /// settlement is the store's: applied now, or kept and sent by the flush
    /// (under the same batch id) when Redis is down or does not answer.
    pub async fn settle(&self, tenant: usize, limits: &TenantLimits, request: SettleRequest<'_>) {
        let lease = request.lease.unwrap_or("");
        if !lease.is_empty() {
            lock(&self.inner.leases).remove(lease);
        }
        let queue = self.is_up().then(|| self.queue()).flatten();
        let Some(queue) = queue else {
            self.inner
                .shared
                .defer(tenant, request.period_id, lease, request.usage);
            return;
        };
        let (reply, answer) = oneshot::channel();
        let op = SettleOp {
            tenant,
            period_id: request.period_id.to_string(),
            rpm: u64::from(limits.requests_per_minute.unwrap_or(0)),
            tpm: limits.tokens_per_minute.unwrap_or(0),
            request_delta: request.request_delta,
            token_delta: request.token_delta,
            lease: lease.to_string(),
            usage: request.usage.clone(),
            reply,
        };
        match queue.send(Op::Settle(op)) {
            Ok(()) => {
                let _ = self.answer("settle", answer).await;
            }
            Err(mpsc::error::SendError(Op::Settle(op))) => {
                self.inner
                    .shared
                    .failed("settle", "the Redis batching task has stopped");
                self.inner
                    .shared
                    .defer(op.tenant, &op.period_id, &op.lease, &op.usage);
            }
            Err(_) => {}
        }
    }

    /// A request that ended without settling (its task panicked): its lease
    /// is no longer renewed and is released by the next flush.
    pub fn abandon_lease(&self, tenant: usize, lease: &str) {
        if lease.is_empty() {
            return;
        }
        lock(&self.inner.leases).remove(lease);
        lock(&self.inner.shared.ledger)
            .unreleased
            .push((tenant, lease.to_string()));
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

    /// The period's usage: Redis's counters plus what is pending here.
    /// The flag says Redis could not be read.
    pub async fn usage(&self, tenant: usize, period_id: &str) -> (PeriodUsage, bool) {
        let mut usage = {
            let ledger = lock(&self.inner.shared.ledger);
            let mut usage = ledger
                .pending
                .get(&(tenant, period_id.to_string()))
                .cloned()
                .unwrap_or_default();
            if !self.is_up() {
                for unsettled in &ledger.unsettled {
                    if unsettled.tenant == tenant && unsettled.period_id == period_id {
                        usage.add(&unsettled.usage);
                    }
                }
            }
            usage
        };
        if !self.is_up() {
            return (usage, true);
        }
        let key = self.inner.keys[tenant].usage(period_id);
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
        if matches!(ping, Ok(Ok(_))) && !self.inner.shared.up.swap(true, Ordering::Relaxed) {
            metrics::REDIS_UP.set(1);
            // Every operation's error count starts at 0, so rates work at once.
            for op in ["admit", "settle", "usage", "flush", "renew", "overflow"] {
                metrics::REDIS_ERRORS.with_label_values(&[op]);
            }
            info!("Redis is back; limits are shared again");
        }
    }

    /// Pays what this instance owes Redis: usage recorded while it was
    /// down, batches whose answer never came (each under its own id, so one
    /// Redis did apply counts once), and leases to release.
    async fn flush_pending(&self) {
        let (batches, unreleased) = {
            let mut ledger = lock(&self.inner.shared.ledger);
            let pending: Vec<((usize, String), PeriodUsage)> = ledger.pending.drain().collect();
            for ((tenant, period_id), usage) in pending {
                ledger.unsettled.push(Unsettled {
                    id: crate::ids::random_token(),
                    tenant,
                    period_id,
                    rpm: 0,
                    tpm: 0,
                    corrections: Vec::new(),
                    leases: Vec::new(),
                    usage,
                });
            }
            (
                std::mem::take(&mut ledger.unsettled),
                std::mem::take(&mut ledger.unreleased),
            )
        };
        if batches.is_empty() && unreleased.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        for batch in &batches {
            pipe.add_command(batch.command(
                &self.inner.keys[batch.tenant],
                &self.inner.settle,
                false,
            ));
        }
        for (tenant, lease) in &unreleased {
            pipe.zrem(&self.inner.keys[*tenant].inflight, lease);
        }
        let pipe = &pipe;
        let results: Option<Vec<RedisResult<redis::Value>>> = self
            .call("flush", |mut conn| async move {
                pipe.clone().ignore_errors().query_async(&mut conn).await
            })
            .await;
        let mut ledger = lock(&self.inner.shared.ledger);
        match results {
            Some(results) if results.len() == batches.len() + unreleased.len() => {
                let mut results = results.into_iter();
                let mut applied = 0;
                for batch in batches {
                    match results.next() {
                        Some(Ok(_)) => applied += 1,
                        _ => ledger.unsettled.push(batch),
                    }
                }
                for lease in unreleased {
                    if !matches!(results.next(), Some(Ok(_))) {
                        ledger.unreleased.push(lease);
                    }
                }
                info!(
                    batches = applied,
                    "flushed usage and lease releases recorded while Redis was unavailable"
                );
            }
            _ => {
                // Kept with their ids: sent again by the next flush.
                ledger.unsettled.extend(batches);
                ledger.unreleased.extend(unreleased);
            }
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
