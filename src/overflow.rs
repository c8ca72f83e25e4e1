//! The overflow queue: requests over a tenant's limits wait their turn
//! instead of failing, and async jobs run when capacity frees.
//!
//! Each tenant has a FIFO queue: a Redis list `{prefix}:{tenant}:queue` when
//! `redis:` is configured (shared by every instance), else an in-process
//! queue (not durable: lost with the process). Entries are
//!
//! - sync (`s|id|tokens|deadline_ms|instance`): a client connection waiting
//!   on one instance, up to `overflow.max_wait_seconds`;
//! - async (`a|id`): a job stored whole (`{prefix}:{tenant}:job:{id}`), run
//!   by any instance.
//!
//! The [`Drain`] background service visits the tenants in turn (one head
//! per tenant per round, so a busy tenant cannot starve another) and admits
//! a head as soon as the limiter allows. A sync head is admitted only by
//! the instance holding its connection (others wait behind it, keeping the
//! order); the admitted grant is handed to the waiting request, which then
//! proceeds exactly like a direct one. An async head is claimed with `LMOVE`
//! into this instance's processing list `{prefix}:{tenant}:processing:{id}`
//! and acknowledged (removed) once its result is stored. Every instance
//! keeps a heartbeat per tenant; a reaper moves what a silent instance held
//! back to the head of the queue after `jobs.visibility_timeout_seconds`.
//! Delivery is at least once; a job whose result is already stored is
//! acknowledged without running again.
//!
//! A job names its tenant and model (never their positions in the config),
//! so a restart or reload with the config reordered or edited cannot run it
//! as someone else: on pick-up a job whose model is gone, or no longer
//! allowed to its tenant, ends `failed` with an OpenAI-shaped error. Nothing
//! read from Redis is trusted to index anything; a job that cannot run (or
//! whose run panics) fails alone, and the drain goes on.

use crate::config::{Config, TenantOverflow};
use crate::limits::redis::LazyConnection;
use crate::limits::{Grant, Limiter};
use crate::metrics;
use crate::openai::ApiError;
use crate::upstream::Upstreams;
use async_trait::async_trait;
use futures_util::FutureExt;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinSet;
use tracing::{error, info, warn};

/// How often the drain looks at the queues while any has entries.
const TICK: Duration = Duration::from_millis(10);
/// How often it looks when all seemed empty (jobs queued by other instances).
const IDLE_TICK: Duration = Duration::from_millis(200);
/// How often the in-process job store drops expired jobs.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// An async job: the whole request, bound to its tenant and model by name.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Job {
    /// `job_...`
    pub id: String,
    /// The tenant's id, as in the config.
    pub tenant: String,
    /// The public model the request asked for (its route's name).
    pub model: String,
    /// `chat`, `completions` or `embeddings`.
    pub endpoint: String,
    /// The request body (streaming turned off).
    pub body: String,
    /// Client headers passed upstream (`accept`, `user-agent`, `openai-beta`).
    pub headers: Vec<(String, String)>,
    /// Tokens to reserve at admission.
    pub tokens: u64,
    /// Unix time of submission, ms.
    pub created_ms: u64,
    /// Where to POST the result: a normalised URL that was on the tenant's
    /// allow-list at submission (and is checked again at delivery).
    #[serde(default)]
    pub callback: Option<String>,
}

impl Job {
    /// Bytes the job holds in memory (the in-process store's bound).
    fn size(&self) -> usize {
        self.body.len()
            + self.id.len()
            + self.callback.as_ref().map_or(0, String::len)
            + self
                .headers
                .iter()
                .map(|(n, v)| n.len() + v.len())
                .sum::<usize>()
    }
}

/// A finished job's answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobResult {
    /// The provider's (or the gateway's error) status.
    pub status: u16,
    /// The response body.
    pub body: String,
}

impl JobResult {
    /// A job that failed in the gateway, with the error's OpenAI body.
    pub fn failed(error: &ApiError) -> Self {
        JobResult {
            status: error.status,
            body: String::from_utf8_lossy(&error.body()).into_owned(),
        }
    }
}

/// A job's state for `GET /v1/jobs/{id}`.
#[derive(Debug, Clone, PartialEq)]
pub enum JobState {
    /// Waiting; 1-based position in the tenant's queue when known.
    Queued(Option<usize>),
    /// Claimed by an instance and running.
    Running,
    /// Finished.
    Done(JobResult),
}

/// Runs an admitted job; the gateway implements it.
#[async_trait]
pub trait JobRunner: Send + Sync {
    /// Forwards the job's request as `tenant`'s request for `route` (both
    /// indices in the running config, resolved from the job's names) and
    /// returns the answer; settles `grant`.
    async fn run_job(&self, job: &Job, tenant: usize, route: usize, grant: Grant) -> JobResult;
    /// POSTs a signed callback body to `url`; whether it was accepted (2xx).
    async fn post_callback(&self, url: &str, body: &[u8], signature: &str) -> bool;
}

/// Delays between callback delivery attempts.
const CALLBACK_BACKOFF: [Duration; 5] = [
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
];

/// The `x-runestone-signature` value for a callback body: `t=<unix
/// seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>" keyed with the tenant's
/// callback secret>`. Receivers recompute it and compare in constant time,
/// and reject old timestamps.
pub fn sign_callback(secret: &[u8], unix_secs: u64, body: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(unix_secs.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!(
        "t={unix_secs},v1={}",
        hex::encode(mac.finalize().into_bytes())
    )
}

/// The callback body for a finished job. The answer is embedded as the
/// provider sent it (after the gateway's masking), never re-serialised, so
/// nothing the masking saw escaped is turned back into plain text.
fn callback_body(job_id: &str, result: &JobResult) -> Vec<u8> {
    #[derive(Serialize)]
    struct Response<'a> {
        status: u16,
        body: Body<'a>,
    }
    #[derive(Serialize)]
    #[serde(untagged)]
    enum Body<'a> {
        Json(&'a serde_json::value::RawValue),
        Text(&'a str),
    }
    #[derive(Serialize)]
    struct Callback<'a> {
        id: &'a str,
        object: &'static str,
        status: &'static str,
        response: Response<'a>,
    }
    let body = match serde_json::from_str::<&serde_json::value::RawValue>(&result.body) {
        Ok(raw) => Body::Json(raw),
        Err(_) => Body::Text(&result.body),
    };
    let callback = Callback {
        id: job_id,
        object: "runestone.job",
        status: if result.status < 400 {
            "completed"
        } else {
            "failed"
        },
        response: Response {
            status: result.status,
            body,
        },
    };
    serde_json::to_vec(&callback).unwrap_or_default()
}

/// Why a request could not be parked or a job stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParkRefusal {
    /// `max_parked` reached.
    Full,
    /// The shared queue (Redis) cannot be reached.
    Unavailable,
    /// The in-process job store is at `jobs.in_process_max_jobs` or
    /// `in_process_max_bytes`; room frees in about this many ms.
    StoreFull(u64),
}

/// How a sync wait ended.
#[derive(Debug)]
pub enum Waited {
    /// Admitted: proceed with this grant.
    Admitted(Grant),
    /// `max_wait` passed.
    TimedOut,
}

#[derive(Debug, Clone, PartialEq)]
enum Entry {
    Sync {
        id: String,
        tokens: u64,
        deadline_ms: u64,
        owner: String,
    },
    Async {
        id: String,
    },
}

impl Entry {
    fn encode(&self) -> String {
        match self {
            Entry::Sync {
                id,
                tokens,
                deadline_ms,
                owner,
            } => format!("s|{id}|{tokens}|{deadline_ms}|{owner}"),
            Entry::Async { id } => format!("a|{id}"),
        }
    }

    fn decode(raw: &str) -> Option<Entry> {
        let parts: Vec<&str> = raw.split('|').collect();
        match parts.as_slice() {
            ["s", id, tokens, deadline_ms, owner] |
            // Before 0.2 a sync entry also held its route's position.
            ["s", id, tokens, _, deadline_ms, owner] => Some(Entry::Sync {
                id: id.to_string(),
                tokens: tokens.parse().ok()?,
                deadline_ms: deadline_ms.parse().ok()?,
                owner: owner.to_string(),
            }),
            ["a", id] => Some(Entry::Async { id: id.to_string() }),
            _ => None,
        }
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One job in the in-process store.
struct LocalJob {
    job: Job,
    result: Option<JobResult>,
    running: bool,
    /// Dropped after this: `result_ttl` after it finished, or (unfinished)
    /// seven times that after submission, as in Redis.
    expires_at: Instant,
}

impl LocalJob {
    fn size(&self) -> usize {
        self.job.size() + self.result.as_ref().map_or(0, |r| r.body.len())
    }
}

/// In-process queues and jobs (no Redis): not durable, bounded.
struct LocalState {
    queues: HashMap<usize, VecDeque<Entry>>,
    jobs: HashMap<String, LocalJob>,
    /// Bytes held by `jobs`.
    job_bytes: usize,
    last_sweep: Instant,
}

impl LocalState {
    /// Drops expired jobs (at most once per [`SWEEP_EVERY`]).
    fn sweep(&mut self, now: Instant) {
        if now.duration_since(self.last_sweep) < SWEEP_EVERY {
            return;
        }
        self.last_sweep = now;
        let mut freed = 0;
        self.jobs.retain(|_, job| {
            let keep = job.expires_at > now;
            if !keep {
                freed += job.size();
            }
            keep
        });
        self.job_bytes = self.job_bytes.saturating_sub(freed);
    }

    /// Milliseconds until the soonest job expires (a full store's retry).
    fn soonest_expiry_ms(&self, now: Instant) -> u64 {
        self.jobs
            .values()
            .map(|j| j.expires_at.saturating_duration_since(now))
            .min()
            .map_or(1000, |d| d.as_millis() as u64)
    }
}

struct RedisQueues {
    conn: LazyConnection,
    prefix: String,
    timeout: Duration,
}

impl RedisQueues {
    fn conn(&self) -> Option<ConnectionManager> {
        self.conn.get()
    }
}

/// A client connection parked on this instance.
struct Waiter {
    admit: oneshot::Sender<Grant>,
    /// Its route's index in this process's config.
    route: usize,
}

struct Inner {
    settings: Vec<TenantOverflow>,
    tenant_ids: Vec<String>,
    instance: String,
    waiters: Mutex<HashMap<String, Waiter>>,
    local: Mutex<LocalState>,
    redis: Option<RedisQueues>,
    wake: Notify,
    result_ttl: Duration,
    visibility: Duration,
    max_local_jobs: usize,
    max_local_bytes: usize,
}

/// The overflow queue of every tenant.
#[derive(Clone)]
pub struct Overflow {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Overflow {
    /// Queues for the config's tenants, in Redis when configured.
    pub fn new(config: &Config) -> Self {
        let redis = config.redis.as_ref().map(|settings| RedisQueues {
            conn: LazyConnection::new(settings, "the overflow queue (parking will refuse)"),
            prefix: settings.key_prefix.clone(),
            timeout: settings.timeout,
        });
        Overflow {
            inner: Arc::new(Inner {
                settings: config.tenants.iter().map(|t| t.overflow.clone()).collect(),
                tenant_ids: config.tenants.iter().map(|t| t.id.clone()).collect(),
                instance: crate::ids::random_token(),
                waiters: Mutex::default(),
                local: Mutex::new(LocalState {
                    queues: HashMap::new(),
                    jobs: HashMap::new(),
                    job_bytes: 0,
                    last_sweep: Instant::now(),
                }),
                redis,
                wake: Notify::new(),
                result_ttl: config.jobs.result_ttl,
                visibility: config.jobs.visibility_timeout,
                max_local_jobs: config.jobs.in_process_max_jobs,
                max_local_bytes: config.jobs.in_process_max_bytes,
            }),
        }
    }

    /// The tenant's overflow settings.
    pub fn settings(&self, tenant: usize) -> &TenantOverflow {
        &self.inner.settings[tenant]
    }

    fn key(&self, tenant: usize, suffix: &str) -> String {
        let prefix = self
            .inner
            .redis
            .as_ref()
            .map_or("runestone", |r| r.prefix.as_str());
        format!("{prefix}:{{{}}}:{suffix}", self.inner.tenant_ids[tenant])
    }

    async fn redis<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Option<T> {
        let r = self.inner.redis.as_ref()?;
        let mut conn = r.conn()?;
        match tokio::time::timeout(r.timeout, cmd.query_async::<T>(&mut conn)).await {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                metrics::REDIS_ERRORS.with_label_values(&["overflow"]).inc();
                warn!(error = %e, "overflow queue: Redis call failed");
                None
            }
            Err(_) => {
                metrics::REDIS_ERRORS.with_label_values(&["overflow"]).inc();
                None
            }
        }
    }

    /// Appends an entry unless the tenant has `max_parked` already (or the
    /// shared queue cannot be reached); a refusal is counted.
    async fn push(&self, tenant: usize, entry: &Entry) -> Result<(), ParkRefusal> {
        let pushed = self.try_push(tenant, entry).await;
        match pushed {
            Err(ParkRefusal::Full | ParkRefusal::StoreFull(_)) => self.count(tenant, "full"),
            Err(ParkRefusal::Unavailable) => self.count(tenant, "unavailable"),
            Ok(()) => {}
        }
        pushed
    }

    async fn try_push(&self, tenant: usize, entry: &Entry) -> Result<(), ParkRefusal> {
        let max = self.inner.settings[tenant].max_parked;
        if let Some(r) = &self.inner.redis {
            let script = redis::Script::new(
                "if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end \
                 redis.call('RPUSH', KEYS[1], ARGV[1]) return 1",
            );
            let mut invocation = script.key(self.key(tenant, "queue"));
            invocation.arg(entry.encode()).arg(max);
            let Some(mut conn) = r.conn() else {
                return Err(ParkRefusal::Unavailable);
            };
            return match tokio::time::timeout(r.timeout, invocation.invoke_async::<i64>(&mut conn))
                .await
            {
                Ok(Ok(1)) => Ok(()),
                Ok(Ok(_)) => Err(ParkRefusal::Full),
                _ => {
                    metrics::REDIS_ERRORS.with_label_values(&["overflow"]).inc();
                    Err(ParkRefusal::Unavailable)
                }
            };
        }
        let mut local = lock(&self.inner.local);
        let queue = local.queues.entry(tenant).or_default();
        if queue.len() >= max {
            return Err(ParkRefusal::Full);
        }
        queue.push_back(entry.clone());
        Ok(())
    }

    async fn remove(&self, tenant: usize, entry: &Entry) {
        if self.inner.redis.is_some() {
            let _: Option<i64> = self
                .redis(
                    redis::cmd("LREM")
                        .arg(self.key(tenant, "queue"))
                        .arg(1)
                        .arg(entry.encode()),
                )
                .await;
            return;
        }
        if let Some(queue) = lock(&self.inner.local).queues.get_mut(&tenant) {
            queue.retain(|e| e != entry);
        }
    }

    /// Parks a sync request for `route` (its index in this process's
    /// config): it joins the tenant's queue and waits for
    /// [`Overflow::wait`]. The caller races the wait against the client going
    /// away and calls [`Overflow::abandon`] if it does.
    pub async fn park(
        &self,
        tenant: usize,
        route: usize,
        tokens: u64,
    ) -> Result<Parked, ParkRefusal> {
        let settings = &self.inner.settings[tenant];
        let id = crate::ids::random_token();
        let entry = Entry::Sync {
            id: id.clone(),
            tokens,
            deadline_ms: unix_ms() + settings.max_wait.as_millis() as u64,
            owner: self.inner.instance.clone(),
        };
        let (admit, rx) = oneshot::channel();
        lock(&self.inner.waiters).insert(id.clone(), Waiter { admit, route });
        if let Err(refusal) = self.push(tenant, &entry).await {
            lock(&self.inner.waiters).remove(&id);
            return Err(refusal);
        }
        self.inner.wake.notify_one();
        Ok(Parked {
            tenant,
            entry,
            parked_at: Instant::now(),
            admission: Some(rx),
        })
    }

    /// Waits for the parked request's admission, up to the tenant's
    /// `max_wait`.
    pub async fn wait(&self, parked: &mut Parked) -> Waited {
        let tenant = parked.tenant;
        let max_wait = self.inner.settings[tenant].max_wait;
        let Some(rx) = parked.admission.as_mut() else {
            return Waited::TimedOut;
        };
        let admitted = match tokio::time::timeout(max_wait, &mut *rx).await {
            Ok(result) => result.ok(),
            // A grant may have arrived as the wait ran out: take it.
            Err(_) => rx.try_recv().ok(),
        };
        match admitted {
            Some(grant) => {
                parked.admission = None;
                metrics::OVERFLOW_WAIT
                    .with_label_values(&[&self.inner.tenant_ids[tenant]])
                    .observe(parked.parked_at.elapsed().as_secs_f64());
                self.count(tenant, "admitted");
                Waited::Admitted(grant)
            }
            _ => {
                self.forget(parked).await;
                self.count(tenant, "timeout");
                Waited::TimedOut
            }
        }
    }

    /// A waiting client went away: it gives up its place (a grant that
    /// raced in is given back unused).
    pub async fn abandon(&self, parked: &mut Parked, limiter: &Limiter) {
        self.forget(parked).await;
        if let Some(Ok(grant)) = parked.admission.take().map(|mut rx| rx.try_recv()) {
            limiter.release(grant).await;
        }
        self.count(parked.tenant, "abandoned");
    }

    async fn forget(&self, parked: &Parked) {
        if let Entry::Sync { id, .. } = &parked.entry {
            lock(&self.inner.waiters).remove(id);
        }
        self.remove(parked.tenant, &parked.entry).await;
    }

    fn count(&self, tenant: usize, outcome: &str) {
        metrics::OVERFLOW_TOTAL
            .with_label_values(&[&self.inner.tenant_ids[tenant], outcome])
            .inc();
    }

    /// Stores an async job of `tenant` (its index) and queues it; its id.
    pub async fn submit(&self, tenant: usize, job: Job) -> Result<String, ParkRefusal> {
        let id = job.id.clone();
        if self.inner.redis.is_some() {
            let stored = serde_json::to_string(&job).unwrap_or_default();
            let key = self.key(tenant, &format!("job:{id}"));
            let set: Option<()> = self
                .redis(
                    redis::cmd("HSET")
                        .arg(&key)
                        .arg("request")
                        .arg(stored)
                        .arg("state")
                        .arg("queued"),
                )
                .await;
            set.ok_or(ParkRefusal::Unavailable)?;
            // Unfinished jobs are kept long enough to be found again.
            let _: Option<i64> = self
                .redis(
                    redis::cmd("EXPIRE")
                        .arg(&key)
                        .arg(self.inner.result_ttl.as_secs() * 7),
                )
                .await;
        } else {
            self.store_local(job)?;
        }
        if let Err(refusal) = self.push(tenant, &Entry::Async { id: id.clone() }).await {
            if self.inner.redis.is_none() {
                let mut local = lock(&self.inner.local);
                if let Some(removed) = local.jobs.remove(&id) {
                    local.job_bytes = local.job_bytes.saturating_sub(removed.size());
                }
            }
            return Err(refusal);
        }
        self.inner.wake.notify_one();
        Ok(id)
    }

    /// Keeps a job in the in-process store, within its bounds.
    fn store_local(&self, job: Job) -> Result<(), ParkRefusal> {
        let now = Instant::now();
        let mut local = lock(&self.inner.local);
        local.sweep(now);
        let size = job.size();
        if local.jobs.len() >= self.inner.max_local_jobs
            || local.job_bytes + size > self.inner.max_local_bytes
        {
            return Err(ParkRefusal::StoreFull(local.soonest_expiry_ms(now)));
        }
        local.job_bytes += size;
        local.jobs.insert(
            job.id.clone(),
            LocalJob {
                job,
                result: None,
                running: false,
                expires_at: now + self.inner.result_ttl * 7,
            },
        );
        Ok(())
    }

    /// The state of the tenant's job `id`; `None` when it has no such job
    /// (another tenant's job is not found either).
    pub async fn job_state(
        &self,
        tenant: usize,
        id: &str,
    ) -> Result<Option<JobState>, ParkRefusal> {
        if self.inner.redis.is_none() {
            let mut local = lock(&self.inner.local);
            local.sweep(Instant::now());
            let Some(job) = local.jobs.get(id) else {
                return Ok(None);
            };
            if job.job.tenant != self.inner.tenant_ids[tenant] {
                return Ok(None);
            }
            return Ok(Some(match (&job.result, job.running) {
                (Some(result), _) => JobState::Done(result.clone()),
                (None, true) => JobState::Running,
                (None, false) => JobState::Queued(local.queues.get(&tenant).and_then(|q| {
                    q.iter()
                        .position(|e| matches!(e, Entry::Async { id: j } if j == id))
                        .map(|p| p + 1)
                })),
            }));
        }
        let key = self.key(tenant, &format!("job:{id}"));
        let fields: Option<(Option<String>, Option<String>)> = self
            .redis(redis::cmd("HMGET").arg(&key).arg("state").arg("result"))
            .await;
        let (state, result) = fields.ok_or(ParkRefusal::Unavailable)?;
        Ok(match (state.as_deref(), result) {
            (None, _) => None,
            (_, Some(result)) => Some(JobState::Done(
                serde_json::from_str(&result).unwrap_or_else(|_| {
                    JobResult::failed(&ApiError::internal(
                        "The job's stored result cannot be read.",
                    ))
                }),
            )),
            (Some("running"), None) => Some(JobState::Running),
            (Some(_), None) => {
                let position: Option<Option<i64>> = self
                    .redis(
                        redis::cmd("LPOS")
                            .arg(self.key(tenant, "queue"))
                            .arg(Entry::Async { id: id.to_string() }.encode()),
                    )
                    .await;
                Some(JobState::Queued(
                    position.flatten().map(|p| p.max(0) as usize + 1),
                ))
            }
        })
    }
}

/// A parked request's place in its queue.
#[derive(Debug)]
pub struct Parked {
    tenant: usize,
    entry: Entry,
    parked_at: Instant,
    admission: Option<oneshot::Receiver<Grant>>,
}

/// The drain: admits queue heads as capacity frees, runs async jobs, and
/// keeps this instance's claims alive (a Pingora background service).
pub struct Drain {
    overflow: Overflow,
    limiter: Limiter,
    upstreams: Arc<Upstreams>,
    config: Arc<Config>,
    runner: Arc<dyn JobRunner>,
}

/// A claimed job, and how to acknowledge it.
struct Claim {
    tenant: usize,
    head: Entry,
    /// This instance's processing list (Redis).
    processing: String,
}

impl Drain {
    /// A drain for these queues.
    pub fn new(
        overflow: Overflow,
        limiter: Limiter,
        upstreams: Arc<Upstreams>,
        config: Arc<Config>,
        runner: Arc<dyn JobRunner>,
    ) -> Self {
        Drain {
            overflow,
            limiter,
            upstreams,
            config,
            runner,
        }
    }

    async fn heads(&self, tenant: usize) -> Option<(Entry, usize)> {
        let o = &self.overflow;
        if o.inner.redis.is_some() {
            let queue = o.key(tenant, "queue");
            let mut pipe = redis::pipe();
            pipe.cmd("LINDEX")
                .arg(&queue)
                .arg(0)
                .cmd("LLEN")
                .arg(&queue);
            let r = o.inner.redis.as_ref()?;
            let mut conn = r.conn()?;
            let (head, len): (Option<String>, usize) =
                match tokio::time::timeout(r.timeout, pipe.query_async(&mut conn)).await {
                    Ok(Ok(v)) => v,
                    _ => return None,
                };
            let head = head?;
            return match Entry::decode(&head) {
                Some(entry) => Some((entry, len)),
                None => {
                    // Not ours to read: drop it rather than block the queue.
                    warn!(tenant = %o.inner.tenant_ids[tenant], "dropping an unreadable overflow queue entry");
                    let _: Option<i64> = o
                        .redis(redis::cmd("LREM").arg(&queue).arg(1).arg(&head))
                        .await;
                    None
                }
            };
        }
        let local = lock(&o.inner.local);
        let queue = local.queues.get(&tenant)?;
        Some((queue.front()?.clone(), queue.len()))
    }

    /// Tries the head of one tenant's queue; whether the queue still has
    /// work.
    async fn visit(&self, tenant: usize, running: &mut JoinSet<()>) -> bool {
        let o = &self.overflow;
        let heads = self.heads(tenant).await;
        metrics::OVERFLOW_PARKED
            .with_label_values(&[&o.inner.tenant_ids[tenant]])
            .set(heads.as_ref().map_or(0, |(_, len)| *len as i64));
        let Some((head, _)) = heads else {
            return false;
        };
        match &head {
            Entry::Sync {
                id,
                tokens,
                deadline_ms,
                owner,
            } => {
                if owner != &o.inner.instance {
                    // Another instance's client: it admits its own.
                    if *deadline_ms < unix_ms() {
                        o.remove(tenant, &head).await;
                    }
                    return true;
                }
                let route = lock(&o.inner.waiters).get(id).map(|w| w.route);
                let Some(route) = route.filter(|_| *deadline_ms >= unix_ms()) else {
                    // Its client timed out or left: drop it.
                    o.remove(tenant, &head).await;
                    return true;
                };
                let Some(route) = self.config.models.get(route) else {
                    o.remove(tenant, &head).await;
                    return true;
                };
                if !self.upstreams.can_serve(route) {
                    return true;
                }
                let Ok(grant) = self.limiter.admit(tenant, *tokens).await else {
                    return true;
                };
                o.remove(tenant, &head).await;
                let waiter = lock(&o.inner.waiters).remove(id);
                if let Some(Err(grant)) = waiter.map(|w| w.admit.send(grant)) {
                    // The client left at the last moment.
                    self.limiter.release(grant).await;
                }
                true
            }
            Entry::Async { id } => {
                self.try_job(tenant, &head, id, running).await;
                true
            }
        }
    }

    /// Claims the job at the head of `tenant`'s queue: `None` when there is
    /// nothing to run (someone else's, already done, gone); else the job as
    /// stored (`Err` when it cannot be read).
    async fn claim(&self, claim: &Claim, id: &str) -> Option<Result<Job, String>> {
        let o = &self.overflow;
        let tenant = claim.tenant;
        if o.inner.redis.is_none() {
            let pending = match lock(&o.inner.local).jobs.get(id) {
                Some(job) if job.result.is_none() && !job.running => Some(job.job.clone()),
                _ => None,
            };
            if pending.is_none() {
                o.remove(tenant, &claim.head).await;
            }
            return pending.map(Ok);
        }
        // The head moves into this instance's processing list.
        let claimed: Option<Option<String>> = o
            .redis(
                redis::cmd("LMOVE")
                    .arg(o.key(tenant, "queue"))
                    .arg(&claim.processing)
                    .arg("LEFT")
                    .arg("RIGHT"),
            )
            .await;
        match claimed.flatten() {
            Some(raw) if raw == claim.head.encode() => {}
            Some(_) => {
                // Someone else's head moved under us: put it back.
                self.unclaim(claim).await;
                return None;
            }
            None => return None,
        }
        let key = o.key(tenant, &format!("job:{id}"));
        let fields: Option<(Option<String>, Option<String>)> = o
            .redis(redis::cmd("HMGET").arg(&key).arg("request").arg("result"))
            .await;
        match fields {
            Some((_, Some(_))) | Some((None, _)) => {
                // Already done (a re-queued duplicate) or gone: acknowledge.
                self.acknowledge(claim).await;
                None
            }
            Some((Some(request), None)) => {
                Some(serde_json::from_str::<Job>(&request).map_err(|e| e.to_string()))
            }
            None => {
                self.unclaim(claim).await;
                None
            }
        }
    }

    /// The job's tenant and route in the running config, from its names:
    /// the error it fails with when it cannot run as its own tenant.
    fn resolve(&self, tenant: usize, job: &Job) -> Result<usize, ApiError> {
        let settings = &self.config.tenants[tenant];
        if job.tenant != settings.id {
            return Err(ApiError::internal(
                "The job is stored under another tenant's queue; it was not run.",
            ));
        }
        let (route, _) = self
            .config
            .route(&job.model)
            .ok_or_else(|| ApiError::model_not_found(&job.model))?;
        if !settings.may_use(&job.model) {
            return Err(ApiError::model_not_allowed(&job.model));
        }
        Ok(route)
    }

    async fn try_job(&self, tenant: usize, head: &Entry, id: &str, running: &mut JoinSet<()>) {
        let o = &self.overflow;
        let claim = Claim {
            tenant,
            head: head.clone(),
            processing: o.key(tenant, &format!("processing:{}", o.inner.instance)),
        };
        let job = match self.claim(&claim, id).await {
            None => return,
            Some(Ok(job)) => job,
            Some(Err(why)) => {
                warn!(job = %id, error = %why, "a stored job cannot be read; it fails");
                let result = JobResult::failed(&ApiError::internal(
                    "The stored job could not be read; it was not run.",
                ));
                o.finish_job(&claim, id, &result).await;
                return;
            }
        };
        let route = match self.resolve(tenant, &job) {
            Ok(route) => route,
            Err(error) => {
                warn!(job = %id, tenant = %job.tenant, model = %job.model, code = error.code, "a job can no longer run as submitted; it fails");
                let result = JobResult::failed(&error);
                o.finish_job(&claim, id, &result).await;
                if job.tenant == o.inner.tenant_ids[tenant] {
                    o.deliver_callback(self.runner.as_ref(), tenant, &job, &result)
                        .await;
                }
                return;
            }
        };
        if !self.upstreams.can_serve(&self.config.models[route]) {
            self.unclaim(&claim).await;
            return;
        }
        let grant = match self.limiter.admit(tenant, job.tokens).await {
            Ok(grant) => grant,
            Err(_) => {
                self.unclaim(&claim).await;
                return;
            }
        };
        o.mark_running(tenant, head, id).await;
        let overflow = o.clone();
        let runner = self.runner.clone();
        running.spawn(async move {
            // Run on a task of its own so that a panic fails this job alone
            // (its grant is released by its drop guard) and is answered.
            let run = {
                let (runner, job) = (runner.clone(), job.clone());
                tokio::spawn(async move { runner.run_job(&job, tenant, route, grant).await })
            };
            let result = match run.await {
                Ok(result) => result,
                Err(e) => {
                    error!(job = %job.id, error = %e, "an async job's run failed inside the gateway");
                    JobResult::failed(&ApiError::internal(
                        "The gateway failed while running the job.",
                    ))
                }
            };
            overflow.finish_job(&claim, &job.id, &result).await;
            overflow
                .deliver_callback(runner.as_ref(), tenant, &job, &result)
                .await;
        });
    }

    /// Puts a claimed head back at the head of its queue.
    async fn unclaim(&self, claim: &Claim) {
        let o = &self.overflow;
        if o.inner.redis.is_some() {
            let _: Option<Option<String>> = o
                .redis(
                    redis::cmd("LMOVE")
                        .arg(&claim.processing)
                        .arg(o.key(claim.tenant, "queue"))
                        .arg("RIGHT")
                        .arg("LEFT"),
                )
                .await;
        }
    }

    /// Removes a claimed head from the processing list.
    async fn acknowledge(&self, claim: &Claim) {
        let _: Option<i64> = self
            .overflow
            .redis(
                redis::cmd("LREM")
                    .arg(&claim.processing)
                    .arg(1)
                    .arg(claim.head.encode()),
            )
            .await;
    }

    /// Heartbeats for this instance and re-queues what silent ones held.
    async fn keep_claims(&self) {
        let o = &self.overflow;
        if o.inner.redis.is_none() {
            return;
        }
        let ttl = o.inner.visibility.as_millis() as u64;
        for tenant in 0..o.inner.tenant_ids.len() {
            let workers = o.key(tenant, "workers");
            let _: Option<()> = o
                .redis(
                    redis::cmd("SET")
                        .arg(o.key(tenant, &format!("worker:{}", o.inner.instance)))
                        .arg(1)
                        .arg("PX")
                        .arg(ttl),
                )
                .await;
            let _: Option<i64> = o
                .redis(redis::cmd("SADD").arg(&workers).arg(&o.inner.instance))
                .await;
            let members: Option<Vec<String>> = o.redis(redis::cmd("SMEMBERS").arg(&workers)).await;
            for worker in members.unwrap_or_default() {
                if worker == o.inner.instance {
                    continue;
                }
                let alive: Option<i64> = o
                    .redis(redis::cmd("EXISTS").arg(o.key(tenant, &format!("worker:{worker}"))))
                    .await;
                if alive != Some(0) {
                    continue;
                }
                let processing = o.key(tenant, &format!("processing:{worker}"));
                let mut moved = 0;
                loop {
                    let back: Option<Option<String>> = o
                        .redis(
                            redis::cmd("LMOVE")
                                .arg(&processing)
                                .arg(o.key(tenant, "queue"))
                                .arg("RIGHT")
                                .arg("LEFT"),
                        )
                        .await;
                    match back.flatten() {
                        Some(_) => moved += 1,
                        None => break,
                    }
                }
                let _: Option<i64> = o.redis(redis::cmd("SREM").arg(&workers).arg(&worker)).await;
                if moved > 0 {
                    info!(tenant = %o.inner.tenant_ids[tenant], worker = %worker, moved, "re-queued jobs held by a silent instance");
                    o.inner.wake.notify_one();
                }
            }
        }
    }

    async fn warn_if_redis_may_evict(&self) {
        let o = &self.overflow;
        if o.inner.redis.is_none() {
            return;
        }
        let policy: Option<Vec<String>> = o
            .redis(redis::cmd("CONFIG").arg("GET").arg("maxmemory-policy"))
            .await;
        if let Some(policy) = policy.and_then(|p| p.get(1).cloned()) {
            if policy != "noeviction" {
                warn!(%policy, "Redis maxmemory-policy may evict queued jobs; set it to noeviction (and appendonly yes) for durable async jobs");
            }
        }
    }
}

impl Overflow {
    /// Marks a claimed job running (and, in process, takes it off the queue).
    async fn mark_running(&self, tenant: usize, head: &Entry, id: &str) {
        if self.inner.redis.is_some() {
            let _: Option<i64> = self
                .redis(
                    redis::cmd("HSET")
                        .arg(self.key(tenant, &format!("job:{id}")))
                        .arg("state")
                        .arg("running"),
                )
                .await;
            return;
        }
        let mut local = lock(&self.inner.local);
        if let Some(job) = local.jobs.get_mut(id) {
            job.running = true;
        }
        if let Some(queue) = local.queues.get_mut(&tenant) {
            queue.retain(|e| e != head);
        }
    }

    /// POSTs the result to the job's callback URL, retrying with backoff.
    /// The URL must still be on the tenant's allow-list.
    async fn deliver_callback(
        &self,
        runner: &dyn JobRunner,
        tenant: usize,
        job: &Job,
        result: &JobResult,
    ) {
        let (Some(url), Some(callbacks)) = (&job.callback, &self.inner.settings[tenant].callbacks)
        else {
            return;
        };
        let Some(url) = callbacks.allowed(url) else {
            warn!(job = %job.id, "the job's callback URL is no longer allowed; not delivered");
            self.count(tenant, "callback_failed");
            return;
        };
        let body = callback_body(&job.id, result);
        for (attempt, delay) in std::iter::once(Duration::ZERO)
            .chain(CALLBACK_BACKOFF)
            .enumerate()
        {
            tokio::time::sleep(delay).await;
            let now = unix_ms() / 1000;
            let signature = sign_callback(callbacks.secret.expose().as_bytes(), now, &body);
            if runner.post_callback(url.as_str(), &body, &signature).await {
                return;
            }
            warn!(job = %job.id, attempt = attempt + 1, "callback delivery failed");
        }
        self.count(tenant, "callback_failed");
    }

    /// Stores a job's result (and, with Redis, acknowledges its claim).
    async fn finish_job(&self, claim: &Claim, id: &str, result: &JobResult) {
        let tenant = claim.tenant;
        let outcome = if result.status < 400 {
            "completed"
        } else {
            "failed"
        };
        self.count(tenant, outcome);
        if let Some(r) = &self.inner.redis {
            let key = self.key(tenant, &format!("job:{id}"));
            let stored = serde_json::to_string(result).unwrap_or_default();
            let mut pipe = redis::pipe();
            pipe.cmd("HSET")
                .arg(&key)
                .arg("result")
                .arg(stored)
                .arg("state")
                .arg("done")
                .ignore();
            pipe.cmd("EXPIRE")
                .arg(&key)
                .arg(self.inner.result_ttl.as_secs())
                .ignore();
            // Acknowledge only after the result is stored.
            pipe.cmd("LREM")
                .arg(&claim.processing)
                .arg(1)
                .arg(claim.head.encode())
                .ignore();
            let Some(mut conn) = r.conn() else { return };
            if !matches!(
                tokio::time::timeout(r.timeout * 4, pipe.query_async::<()>(&mut conn)).await,
                Ok(Ok(()))
            ) {
                warn!(job = %id, "could not store a job's result; it will be re-queued and run again");
            }
            return;
        }
        let mut local = lock(&self.inner.local);
        if let Some(queue) = local.queues.get_mut(&tenant) {
            queue.retain(|e| e != &claim.head);
        }
        let expires_at = Instant::now() + self.inner.result_ttl;
        let Some(job) = local.jobs.get_mut(id) else {
            return;
        };
        let before = job.size();
        job.result = Some(result.clone());
        job.expires_at = expires_at;
        let grown = job.size() - before;
        local.job_bytes += grown;
    }
}

#[async_trait]
impl BackgroundService for Drain {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        self.warn_if_redis_may_evict().await;
        let tenants = self.overflow.inner.tenant_ids.len();
        let mut next_claims = Instant::now();
        let mut start = 0;
        let mut running = JoinSet::new();
        loop {
            if Instant::now() >= next_claims {
                self.keep_claims().await;
                next_claims = Instant::now() + self.overflow.inner.visibility / 3;
            }
            // One head per tenant per round, starting with a different
            // tenant each round: fair across tenants.
            let mut busy = false;
            for i in 0..tenants {
                let tenant = (start + i) % tenants;
                // A fault in one tenant's queue must not stop the drain for
                // every tenant.
                match AssertUnwindSafe(self.visit(tenant, &mut running))
                    .catch_unwind()
                    .await
                {
                    Ok(more) => busy |= more,
                    Err(_) => {
                        error!(tenant = %self.overflow.inner.tenant_ids[tenant], "the overflow drain failed on a queue head; going on");
                    }
                }
            }
            start = (start + 1) % tenants.max(1);
            let pause = if busy { TICK } else { IDLE_TICK };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = self.overflow.inner.wake.notified() => {}
                _ = shutdown.changed() => {
                    // Stop claiming; let the jobs already running finish
                    // (Pingora bounds this by the grace period). A job cut
                    // off anyway stays claimed and is re-queued by another
                    // instance after the visibility timeout.
                    if !running.is_empty() {
                        info!(jobs = running.len(), "waiting for running async jobs before stopping");
                    }
                    while running.join_next().await.is_some() {}
                    return;
                }
                Some(_) = running.join_next(), if !running.is_empty() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_callbacks_with_hmac_sha256_over_timestamp_and_body() {
        // HMAC-SHA256("key", "1700000000.{}"), computed with Python's hmac.
        let signature = sign_callback(b"key", 1_700_000_000, b"{}");
        assert_eq!(
            signature,
            "t=1700000000,v1=9d713ed406bb7076d4123f0dc2c39d2df5c654ed4b0cd56b52c8b4c940bd63ae"
        );
        assert_ne!(signature, sign_callback(b"key", 1_700_000_001, b"{}"));
        assert_ne!(signature, sign_callback(b"other", 1_700_000_000, b"{}"));
    }

    #[test]
    fn entries_round_trip() {
        let sync = Entry::Sync {
            id: "abc".into(),
            tokens: 42,
            deadline_ms: 1_700_000_000_000,
            owner: "0123abcd".into(),
        };
        assert_eq!(Entry::decode(&sync.encode()), Some(sync.clone()));
        // The older form, with a route position, still reads.
        assert_eq!(
            Entry::decode("s|abc|42|7|1700000000000|0123abcd"),
            Some(sync)
        );
        let job = Entry::Async { id: "job_1".into() };
        assert_eq!(Entry::decode(&job.encode()), Some(job));
        assert_eq!(Entry::decode("x|y"), None);
        assert_eq!(Entry::decode("s|a|notanumber|2|o"), None);
        assert_eq!(Entry::decode(""), None);
    }

    #[test]
    fn callback_bodies_embed_the_answer_as_sent() {
        let result = JobResult {
            status: 200,
            body: r#"{"note":"sk\u002d*****","n":1.50}"#.into(),
        };
        let body = String::from_utf8(callback_body("job_1", &result)).unwrap();
        assert_eq!(
            body,
            r#"{"id":"job_1","object":"runestone.job","status":"completed","response":{"status":200,"body":{"note":"sk\u002d*****","n":1.50}}}"#
        );
        let text = JobResult {
            status: 502,
            body: "not json".into(),
        };
        let body: serde_json::Value = serde_json::from_slice(&callback_body("j", &text)).unwrap();
        assert_eq!(body["status"], "failed");
        assert_eq!(body["response"]["body"], "not json");
    }
}
