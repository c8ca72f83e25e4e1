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
//! The [`Drain`] background service visits the tenants in weighted turns
//! (each takes up to its `overflow.weight` of heads per round, so a busy
//! tenant cannot starve another; `turns.rs`) and admits a head as soon as
//! the limiter allows; an async head also needs one of the instance's
//! `jobs.concurrency` slots. A sync head is admitted only by
//! the instance holding its connection (others wait behind it, keeping the
//! order); the admitted grant is handed to the waiting request, which then
//! proceeds exactly like a direct one. While a head waits for the tenant's
//! limits, newcomers park behind it ([`Overflow::head_waits`]); a head that
//! waits for something else (a backend, a job slot) is passed by the
//! requests behind it that can be served. An async head is claimed with `LMOVE`
//! into this instance's processing list `{prefix}:{tenant}:processing:{id}`
//! and acknowledged (removed) once its result is stored. Every instance
//! keeps a heartbeat per tenant; a reaper moves what a silent instance held
//! back to the head of the queue after `jobs.visibility_timeout_seconds`.
//! Delivery is at least once; a job whose result is already stored is
//! acknowledged without running again.
//!
//! A job runs in attempts: each bounded by `jobs.timeout_seconds` and
//! cancellable (`DELETE /v1/jobs/{id}`), each admitted and billed on its
//! own; one that fails in a way worth retrying waits out a backoff
//! (`retry.rs`) in the tenant's `delayed` set and rejoins the queue's
//! tail. Submissions are unique per idempotency key. How records change,
//! atomically per tenant, is `records.rs`.
//!
//! A job names its tenant and model (never their positions in the config),
//! so a restart or reload with the config reordered or edited cannot run it
//! as someone else: on pick-up a job whose model is gone, or no longer
//! allowed to its tenant, ends `failed` with an OpenAI-shaped error. Nothing
//! read from Redis is trusted to index anything; a job that cannot run (or
//! whose run panics) fails alone, and the drain goes on.

mod drain;
mod jobs;
mod local_jobs;
mod queue;
mod records;
mod retry;
mod turns;

pub use drain::Drain;
pub use jobs::{
    sign_callback, Attempt, AttemptControl, Ended, Job, JobResult, JobRunner, JobState, JobView,
    Submitted,
};
pub use queue::Parked;
pub use records::{JobPage, ListRefusal};

use crate::config::{Config, JobSettings, TenantOverflow};
use crate::limits::{Grant, LimitKind, Refusal};
use crate::lock;
use crate::metrics;
use crate::redis_conn::{Conn, RedisConnection};
use records::LocalState;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, watch, Notify};
use tracing::warn;

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
    /// A job's submission went to Redis but was not answered in time: it
    /// may or may not have been stored (and may run).
    Unconfirmed,
}

/// How a sync wait ended.
#[derive(Debug)]
pub enum Waited {
    /// Admitted: proceed with this grant.
    Admitted(Grant),
    /// Refused while parked, by a limit no wait mends (the tenant's budget
    /// ran out): answer with it now.
    Refused(Refusal),
    /// `max_wait` passed.
    TimedOut,
    /// This instance is stopping: its drain admits no more.
    Stopping,
}

const LIMITS: [LimitKind; 4] = [
    LimitKind::Requests,
    LimitKind::Tokens,
    LimitKind::Concurrency,
    LimitKind::Budget,
];

/// `limit` as an atomic holds it: 0 for none, else its place in `LIMITS`
/// plus one.
fn limit_code(limit: Option<LimitKind>) -> u8 {
    limit
        .and_then(|l| LIMITS.iter().position(|k| *k == l))
        .map_or(0, |i| i as u8 + 1)
}

/// The limit [`limit_code`] gave `code`.
fn limit_of(code: u8) -> Option<LimitKind> {
    LIMITS.get(usize::from(code).checked_sub(1)?).copied()
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

struct RedisQueues {
    conn: Arc<RedisConnection>,
    prefix: String,
    timeout: Duration,
}

impl RedisQueues {
    fn conn(&self) -> Option<Conn> {
        self.conn.get()
    }
}

/// A client connection parked on this instance.
struct Waiter {
    /// Its admission, or the refusal that ends its wait.
    admit: oneshot::Sender<Result<Grant, Refusal>>,
    /// Its route's index in this process's config.
    route: usize,
    tenant: usize,
    /// Its entry once Redis holds it, to be put back if Redis loses it
    /// ([`Overflow::restore_places`]).
    queued: Option<queue::Entry>,
    parked_at: std::time::Instant,
}

struct Inner {
    settings: Vec<TenantOverflow>,
    tenant_ids: Vec<String>,
    instance: String,
    waiters: Mutex<HashMap<String, Waiter>>,
    /// How many of `waiters` each tenant has.
    parked_here: Vec<AtomicUsize>,
    /// Tenants whose heads the drain visits at once: a request of theirs
    /// ended while some were parked here ([`Overflow::capacity_freed`]),
    /// or one just parked.
    due: Mutex<Vec<usize>>,
    /// Per tenant: the limit its queue's head waits for, as the drain last
    /// saw it ([`Overflow::head_waits`]; [`limit_code`]).
    head_waits: Vec<AtomicU8>,
    /// The drain stopped ([`Overflow::dismiss_waiters`]): nothing parks.
    stopping: AtomicBool,
    local: Mutex<LocalState>,
    redis: Option<RedisQueues>,
    wake: Notify,
    jobs: JobSettings,
    /// Jobs running in this process: their tenant, and how to stop them.
    running: Mutex<HashMap<String, (usize, watch::Sender<bool>)>>,
    /// Callbacks being delivered.
    callbacks: Mutex<tokio::task::JoinSet<()>>,
}

/// The overflow queue of every tenant.
#[derive(Clone)]
pub struct Overflow {
    inner: Arc<Inner>,
}

/// A Redis reply within its time limit, or `None` (the failure counted,
/// and logged unless it is the time limit).
fn answered<T>(reply: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>) -> Option<T> {
    match reply {
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

impl Overflow {
    /// Queues for the config's tenants, in Redis when configured.
    pub fn new(config: &Config, conn: Option<Arc<RedisConnection>>) -> Self {
        let redis = config
            .redis
            .as_ref()
            .zip(conn)
            .map(|(settings, conn)| RedisQueues {
                conn,
                prefix: settings.key_prefix.clone(),
                timeout: settings.timeout,
            });
        Overflow {
            inner: Arc::new(Inner {
                settings: config.tenants.iter().map(|t| t.overflow.clone()).collect(),
                tenant_ids: config.tenants.iter().map(|t| t.id.clone()).collect(),
                instance: crate::ids::random_token(),
                waiters: Mutex::default(),
                parked_here: config.tenants.iter().map(|_| AtomicUsize::new(0)).collect(),
                due: Mutex::default(),
                head_waits: config.tenants.iter().map(|_| AtomicU8::new(0)).collect(),
                stopping: AtomicBool::new(false),
                local: Mutex::new(LocalState {
                    queues: HashMap::new(),
                    jobs: local_jobs::LocalJobs::new(local_jobs::Bounds::new(
                        config.jobs.in_process_max_jobs,
                        config.jobs.in_process_max_bytes,
                        config.tenants.len(),
                        config.jobs.result_ttl,
                        config.jobs.idempotency_window,
                    )),
                    delayed: Vec::new(),
                }),
                redis,
                wake: Notify::new(),
                jobs: config.jobs,
                running: Mutex::default(),
                callbacks: Mutex::default(),
            }),
        }
    }

    /// A request of `tenant` ended and its slot is free: while requests of
    /// the tenant are parked on this instance, the drain looks at its queue
    /// at once (else within its tick, and a newcomer arriving meanwhile
    /// would take the slot ahead of them).
    pub fn capacity_freed(&self, tenant: usize) {
        let parked = self.inner.parked_here.get(tenant);
        if parked.is_some_and(|n| n.load(Ordering::Relaxed) > 0) {
            self.visit_soon(tenant);
        }
    }

    /// Wakes the drain to visit `tenant`'s head at once.
    fn visit_soon(&self, tenant: usize) {
        let mut due = lock(&self.inner.due);
        if !due.contains(&tenant) {
            due.push(tenant);
        }
        drop(due);
        self.inner.wake.notify_one();
    }

    /// The tenants to visit at once, named since the last call.
    pub(super) fn take_due(&self) -> Vec<usize> {
        std::mem::take(&mut *lock(&self.inner.due))
    }

    /// Which of `tenant`'s limits its queue head waits for, as this
    /// instance's drain last saw it, if any. A newcomer then parks behind it rather
    /// than take the capacity it waits for: a slot that frees goes to the
    /// request parked longest, on whichever instance, and not to whoever
    /// asks first (with Redis, a newcomer's admission takes one round trip
    /// and the head's three). A head that waits for something else (a
    /// backend, a job slot, tokens, a spent budget) holds nobody up.
    pub fn head_waits(&self, tenant: usize) -> Option<LimitKind> {
        let code = self.inner.head_waits.get(tenant)?.load(Ordering::Relaxed);
        limit_of(code)
    }

    /// What the drain saw at `tenant`'s head ([`Overflow::head_waits`]).
    pub(super) fn set_head_waits(&self, tenant: usize, limit: Option<LimitKind>) {
        self.inner.head_waits[tenant].store(limit_code(limit), Ordering::Relaxed);
    }

    /// The drain stops (graceful shutdown or upgrade): every request
    /// parked here is answered at once ([`Waited::Stopping`]) rather than
    /// held, unadmitted, until the process ends; nothing parks after.
    pub(super) fn dismiss_waiters(&self) {
        // Before the waiters are taken: a request parking meanwhile sees
        // it once its place is kept, and gives it up.
        self.inner.stopping.store(true, Ordering::SeqCst);
        let waiters = std::mem::take(&mut *lock(&self.inner.waiters));
        for waiter in waiters.values() {
            self.inner.parked_here[waiter.tenant].fetch_sub(1, Ordering::Relaxed);
        }
        // Dropped here, not under the lock: each waiting client's
        // admission ends.
        drop(waiters);
    }

    /// Keeps a parked client's place: how the drain admits it.
    fn add_waiter(&self, id: String, waiter: Waiter) {
        self.inner.parked_here[waiter.tenant].fetch_add(1, Ordering::Relaxed);
        lock(&self.inner.waiters).insert(id, waiter);
    }

    /// Takes a parked client's place away (admitted, gone or timed out).
    fn take_waiter(&self, id: &str) -> Option<Waiter> {
        let waiter = lock(&self.inner.waiters).remove(id)?;
        self.inner.parked_here[waiter.tenant].fetch_sub(1, Ordering::Relaxed);
        Some(waiter)
    }

    /// The tenant's overflow settings.
    pub fn settings(&self, tenant: usize) -> &TenantOverflow {
        &self.inner.settings[tenant]
    }

    pub(super) fn key(&self, tenant: usize, suffix: &str) -> String {
        let prefix = self
            .inner
            .redis
            .as_ref()
            .map_or("runestone", |r| r.prefix.as_str());
        format!("{prefix}:{{{}}}:{suffix}", self.inner.tenant_ids[tenant])
    }

    pub(super) async fn redis<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Option<T> {
        let r = self.inner.redis.as_ref()?;
        let mut conn = r.conn()?;
        answered(tokio::time::timeout(r.timeout, cmd.query_async::<T>(&mut conn)).await)
    }

    /// Runs a pipeline of reads within the Redis timeout.
    pub(super) async fn redis_pipe<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Option<T> {
        let r = self.inner.redis.as_ref()?;
        let mut conn = r.conn()?;
        answered(tokio::time::timeout(r.timeout * 4, pipe.query_async::<T>(&mut conn)).await)
    }

    pub(super) fn count(&self, tenant: usize, outcome: &str) {
        metrics::OVERFLOW_TOTAL
            .with_label_values(&[&self.inner.tenant_ids[tenant], outcome])
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_waits_round_trip_through_their_code() {
        for head in [
            None,
            Some(LimitKind::Requests),
            Some(LimitKind::Tokens),
            Some(LimitKind::Concurrency),
            Some(LimitKind::Budget),
        ] {
            assert_eq!(limit_of(limit_code(head)), head);
        }
        assert_eq!(limit_of(200), None);
    }
}
