//! The overflow queue: requests over a tenant's limits wait their turn
//! instead of failing, and async jobs run when capacity frees.
//!
//! Each tenant has a FIFO queue: a Redis list `{prefix}:{tenant}:queue` when
//! `redis:` is configured (shared by every instance), else an in-process
//! queue (not durable: lost with the process). Entries are
//!
//! - sync (`s|id|tokens|route|deadline_ms|instance`): a client connection
//!   waiting on one instance, up to `overflow.max_wait_seconds`;
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

use crate::config::{Config, TenantOverflow};
use crate::limits::redis::LazyConnection;
use crate::limits::{Grant, Limiter, Settlement};
use crate::metrics;
use crate::upstream::Upstreams;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinSet;
use tracing::{info, warn};

/// How often the drain looks at the queues while any has entries.
const TICK: Duration = Duration::from_millis(10);
/// How often it looks when all seemed empty (jobs queued by other instances).
const IDLE_TICK: Duration = Duration::from_millis(200);

/// An async job: the whole request, and its result once done.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Job {
    /// `job_...`
    pub id: String,
    /// Index of the tenant in the config.
    pub tenant: usize,
    /// Index of the requested route in the config.
    pub route: usize,
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
    /// Where to POST the result (checked against the tenant's allow-list).
    #[serde(default)]
    pub callback: Option<String>,
}

/// A finished job's answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobResult {
    /// The provider's (or the gateway's error) status.
    pub status: u16,
    /// The response body.
    pub body: String,
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
    /// Forwards the job's request and returns the answer; settles `grant`.
    async fn run_job(&self, job: &Job, grant: Grant) -> JobResult;
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

/// The callback body for a finished job.
fn callback_body(job: &Job, result: &JobResult) -> Vec<u8> {
    let response: serde_json::Value = serde_json::from_str(&result.body)
        .unwrap_or_else(|_| serde_json::Value::String(result.body.clone()));
    let body = serde_json::json!({
        "id": job.id,
        "object": "runestone.job",
        "status": if result.status < 400 { "completed" } else { "failed" },
        "response": { "status": result.status, "body": response },
    });
    serde_json::to_vec(&body).expect("a JSON value serialises")
}

/// Why a request could not be parked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParkRefusal {
    /// `max_parked` reached.
    Full,
    /// The shared queue (Redis) cannot be reached.
    Unavailable,
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
        route: usize,
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
                route,
                deadline_ms,
                owner,
            } => {
                format!("s|{id}|{tokens}|{route}|{deadline_ms}|{owner}")
            }
            Entry::Async { id } => format!("a|{id}"),
        }
    }

    fn decode(raw: &str) -> Option<Entry> {
        let mut parts = raw.split('|');
        match parts.next()? {
            "s" => Some(Entry::Sync {
                id: parts.next()?.to_string(),
                tokens: parts.next()?.parse().ok()?,
                route: parts.next()?.parse().ok()?,
                deadline_ms: parts.next()?.parse().ok()?,
                owner: parts.next()?.to_string(),
            }),
            "a" => Some(Entry::Async {
                id: parts.next()?.to_string(),
            }),
            _ => None,
        }
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// In-process queues and jobs (no Redis): not durable.
#[derive(Default)]
struct LocalState {
    queues: HashMap<usize, VecDeque<Entry>>,
    jobs: HashMap<String, (Job, Option<JobResult>, bool)>,
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

struct Inner {
    settings: Vec<TenantOverflow>,
    tenant_ids: Vec<String>,
    instance: String,
    waiters: Mutex<HashMap<String, oneshot::Sender<Grant>>>,
    local: Mutex<LocalState>,
    redis: Option<RedisQueues>,
    wake: Notify,
    result_ttl: Duration,
    visibility: Duration,
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
                instance: format!("{:016x}", fastrand::u64(..)),
                waiters: Mutex::default(),
                local: Mutex::default(),
                redis,
                wake: Notify::new(),
                result_ttl: config.jobs.result_ttl,
                visibility: config.jobs.visibility_timeout,
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
            Err(ParkRefusal::Full) => self.count(tenant, "full"),
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

    /// Parks a sync request: it joins the tenant's queue and waits for
    /// [`Overflow::wait`]. The caller races the wait against the client going
    /// away and calls [`Overflow::abandon`] if it does.
    pub async fn park(
        &self,
        tenant: usize,
        route: usize,
        tokens: u64,
    ) -> Result<Parked, ParkRefusal> {
        let settings = &self.inner.settings[tenant];
        let id = format!("{:016x}", fastrand::u64(..));
        let entry = Entry::Sync {
            id: id.clone(),
            tokens,
            route,
            deadline_ms: unix_ms() + settings.max_wait.as_millis() as u64,
            owner: self.inner.instance.clone(),
        };
        let (tx, rx) = oneshot::channel();
        lock(&self.inner.waiters).insert(id.clone(), tx);
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
    /// raced in is released unused).
    pub async fn abandon(&self, parked: &mut Parked, limiter: &Limiter) {
        self.forget(parked).await;
        if let Some(Ok(grant)) = parked.admission.take().map(|mut rx| rx.try_recv()) {
            limiter.settle(grant, empty_settlement()).await;
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

    /// Stores an async job and queues it; its id.
    pub async fn submit(&self, job: Job) -> Result<String, ParkRefusal> {
        let id = job.id.clone();
        let tenant = job.tenant;
        if self.inner.redis.is_some() {
            let stored = serde_json::to_string(&job).expect("a job serialises");
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
            lock(&self.inner.local)
                .jobs
                .insert(id.clone(), (job, None, false));
        }
        self.push(tenant, &Entry::Async { id: id.clone() }).await?;
        self.inner.wake.notify_one();
        Ok(id)
    }

    /// The state of the tenant's job `id`; `None` when it has no such job
    /// (another tenant's job is not found either).
    pub async fn job_state(
        &self,
        tenant: usize,
        id: &str,
    ) -> Result<Option<JobState>, ParkRefusal> {
        if self.inner.redis.is_none() {
            let local = lock(&self.inner.local);
            let Some((job, result, running)) = local.jobs.get(id) else {
                return Ok(None);
            };
            if job.tenant != tenant {
                return Ok(None);
            }
            return Ok(Some(match (result, running) {
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
            (_, Some(result)) => serde_json::from_str(&result).ok().map(JobState::Done),
            (Some("running"), None) => Some(JobState::Running),
            (Some(_), None) => {
                let position: Option<Option<i64>> = self
                    .redis(
                        redis::cmd("LPOS")
                            .arg(self.key(tenant, "queue"))
                            .arg(Entry::Async { id: id.to_string() }.encode()),
                    )
                    .await;
                Some(JobState::Queued(position.flatten().map(|p| p as usize + 1)))
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
    routes: Vec<crate::config::ModelRoute>,
    runner: Arc<dyn JobRunner>,
}

impl Drain {
    /// A drain for these queues.
    pub fn new(
        overflow: Overflow,
        limiter: Limiter,
        upstreams: Arc<Upstreams>,
        config: &Config,
        runner: Arc<dyn JobRunner>,
    ) -> Self {
        Drain {
            overflow,
            limiter,
            upstreams,
            routes: config.models.clone(),
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
            return Some((Entry::decode(&head?)?, len));
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
                route,
                deadline_ms,
                owner,
            } => {
                if *deadline_ms < unix_ms()
                    || (owner == &o.inner.instance && !lock(&o.inner.waiters).contains_key(id))
                {
                    // Its client timed out or left: drop it.
                    o.remove(tenant, &head).await;
                    return true;
                }
                if owner != &o.inner.instance || !self.upstreams.can_serve(&self.routes[*route]) {
                    return true;
                }
                let Ok(grant) = self.limiter.admit(tenant, *tokens).await else {
                    return true;
                };
                o.remove(tenant, &head).await;
                let waiter = lock(&o.inner.waiters).remove(id);
                if let Some(Err(grant)) = waiter.map(|tx| tx.send(grant)) {
                    // The client left at the last moment.
                    self.limiter.settle(grant, empty_settlement()).await;
                }
                true
            }
            Entry::Async { id } => {
                self.try_job(tenant, &head, id, running).await;
                true
            }
        }
    }

    async fn try_job(&self, tenant: usize, head: &Entry, id: &str, running: &mut JoinSet<()>) {
        let o = &self.overflow;
        let processing = o.key(tenant, &format!("processing:{}", o.inner.instance));
        let job = if o.inner.redis.is_some() {
            // Claim: the head moves into this instance's processing list.
            let claimed: Option<Option<String>> = o
                .redis(
                    redis::cmd("LMOVE")
                        .arg(o.key(tenant, "queue"))
                        .arg(&processing)
                        .arg("LEFT")
                        .arg("RIGHT"),
                )
                .await;
            match claimed.flatten() {
                Some(raw) if raw == head.encode() => {}
                Some(_) => {
                    // Someone else's head moved under us: put it back.
                    self.unclaim(tenant, &processing).await;
                    return;
                }
                None => return,
            }
            let key = o.key(tenant, &format!("job:{id}"));
            let fields: Option<(Option<String>, Option<String>)> = o
                .redis(redis::cmd("HMGET").arg(&key).arg("request").arg("result"))
                .await;
            let acknowledge = || async {
                let _: Option<i64> = o
                    .redis(
                        redis::cmd("LREM")
                            .arg(&processing)
                            .arg(1)
                            .arg(head.encode()),
                    )
                    .await;
            };
            match fields {
                Some((_, Some(_))) | Some((None, _)) => {
                    // Already done (a re-queued duplicate) or gone: acknowledge.
                    acknowledge().await;
                    return;
                }
                Some((Some(request), None)) => match serde_json::from_str::<Job>(&request) {
                    Ok(job) => job,
                    Err(e) => {
                        warn!(job = %id, error = %e, "dropping a job whose stored request cannot be read");
                        acknowledge().await;
                        return;
                    }
                },
                None => {
                    self.unclaim(tenant, &processing).await;
                    return;
                }
            }
        } else {
            let pending = match lock(&o.inner.local).jobs.get(id) {
                Some((job, None, false)) => Some(job.clone()),
                _ => None,
            };
            match pending {
                Some(job) => job,
                None => {
                    o.remove(tenant, head).await;
                    return;
                }
            }
        };
        if !self.upstreams.can_serve(&self.routes[job.route]) {
            self.unclaim(tenant, &processing).await;
            return;
        }
        let grant = match self.limiter.admit(tenant, job.tokens).await {
            Ok(grant) => grant,
            Err(_) => {
                self.unclaim(tenant, &processing).await;
                return;
            }
        };
        if o.inner.redis.is_some() {
            let _: Option<i64> = o
                .redis(
                    redis::cmd("HSET")
                        .arg(o.key(tenant, &format!("job:{id}")))
                        .arg("state")
                        .arg("running"),
                )
                .await;
        } else {
            let mut local = lock(&o.inner.local);
            if let Some(entry) = local.jobs.get_mut(id) {
                entry.2 = true;
            }
            if let Some(queue) = local.queues.get_mut(&tenant) {
                queue.retain(|e| e != head);
            }
        }
        let overflow = o.clone();
        let runner = self.runner.clone();
        let head = head.clone();
        running.spawn(async move {
            let result = runner.run_job(&job, grant).await;
            overflow.finish_job(&job, &head, &processing, &result).await;
            overflow
                .deliver_callback(runner.as_ref(), &job, &result)
                .await;
        });
    }

    /// Puts a claimed head back at the head of its queue.
    async fn unclaim(&self, tenant: usize, processing: &str) {
        let o = &self.overflow;
        if o.inner.redis.is_some() {
            let _: Option<Option<String>> = o
                .redis(
                    redis::cmd("LMOVE")
                        .arg(processing)
                        .arg(o.key(tenant, "queue"))
                        .arg("RIGHT")
                        .arg("LEFT"),
                )
                .await;
        }
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
    /// POSTs the result to the job's callback URL, retrying with backoff.
    async fn deliver_callback(&self, runner: &dyn JobRunner, job: &Job, result: &JobResult) {
        let (Some(url), Some(callbacks)) =
            (&job.callback, &self.inner.settings[job.tenant].callbacks)
        else {
            return;
        };
        if !callbacks.allows(url) {
            return;
        }
        let body = callback_body(job, result);
        for (attempt, delay) in std::iter::once(Duration::ZERO)
            .chain(CALLBACK_BACKOFF)
            .enumerate()
        {
            tokio::time::sleep(delay).await;
            let now = unix_ms() / 1000;
            let signature = sign_callback(callbacks.secret.expose().as_bytes(), now, &body);
            if runner.post_callback(url, &body, &signature).await {
                return;
            }
            warn!(job = %job.id, attempt = attempt + 1, "callback delivery failed");
        }
        self.count(job.tenant, "callback_failed");
    }

    async fn finish_job(&self, job: &Job, head: &Entry, processing: &str, result: &JobResult) {
        let outcome = if result.status < 400 {
            "completed"
        } else {
            "failed"
        };
        self.count(job.tenant, outcome);
        if let Some(r) = &self.inner.redis {
            let key = self.key(job.tenant, &format!("job:{}", job.id));
            let stored = serde_json::to_string(result).expect("a result serialises");
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
                .arg(processing)
                .arg(1)
                .arg(head.encode())
                .ignore();
            let Some(mut conn) = r.conn() else { return };
            if !matches!(
                tokio::time::timeout(r.timeout * 4, pipe.query_async::<()>(&mut conn)).await,
                Ok(Ok(()))
            ) {
                warn!(job = %job.id, "could not store a job's result; it will be re-queued and run again");
            }
            return;
        }
        let mut local = lock(&self.inner.local);
        if let Some(entry) = local.jobs.get_mut(&job.id) {
            entry.1 = Some(result.clone());
        }
    }
}

fn empty_settlement() -> Settlement {
    Settlement {
        usage: crate::cost::Usage::default(),
        cost_pusd: 0,
        duration: Duration::ZERO,
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
                busy |= self.visit((start + i) % tenants, &mut running).await;
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
            route: 3,
            deadline_ms: 1_700_000_000_000,
            owner: "0123abcd".into(),
        };
        assert_eq!(Entry::decode(&sync.encode()), Some(sync));
        let job = Entry::Async { id: "job_1".into() };
        assert_eq!(Entry::decode(&job.encode()), Some(job));
        assert_eq!(Entry::decode("x|y"), None);
        assert_eq!(Entry::decode("s|a|notanumber|1|2|o"), None);
    }
}
