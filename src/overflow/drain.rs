//! The drain: visits the tenants' queues in weighted turns, admits parked
//! requests as capacity frees, claims and runs async jobs (each attempt
//! bounded in time and cancellable, failed attempts tried again after a
//! backoff, jobs that cannot run failed alone), and keeps this instance's
//! claims alive.

use super::jobs::{Attempt, AttemptControl, Ended, Job, JobResult, JobRunner};
use super::queue::Entry;
use super::turns::{Turns, Visit};
use super::{unix_ms, Overflow};
use crate::config::Config;
use crate::limits::{LimitKind, Limiter};
use crate::lock;
use crate::metrics;
use crate::openai::ApiError;
use crate::upstream::Upstreams;
use futures_util::FutureExt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use tracing::{error, info, warn};

/// How often the drain looks at the queues while any has entries.
const TICK: Duration = Duration::from_millis(10);
/// How often it looks when all seemed empty (jobs queued by other instances).
const IDLE_TICK: Duration = Duration::from_millis(200);
/// How often jobs whose backoff is over are put back in their queue.
const PROMOTE_EVERY: Duration = Duration::from_millis(250);
/// How often the drain checks that Redis still holds the places of the
/// requests parked here ([`Overflow::restore_places`]).
const RESTORE_EVERY: Duration = Duration::from_secs(1);
/// How often running jobs are checked for a cancel asked on another
/// instance.
const CANCEL_POLL: Duration = Duration::from_millis(500);
/// How many entries behind a head that waits for a backend or a job slot
/// the drain looks at for a request it can admit ([`Drain::look_past`]).
const LOOK_PAST: usize = 32;

/// What became of a try to admit a request parked on this instance.
enum Tried {
    /// Admitted, answered, or its stale place cleared away.
    Served,
    /// Nothing can serve its model now.
    NoBackend,
    /// Over the tenant's limits.
    Blocked,
}

/// The drain: admits queue heads as capacity frees, runs async jobs, and
/// keeps this instance's claims alive (a Pingora background service).
pub struct Drain {
    overflow: Overflow,
    limiter: Limiter,
    upstreams: Arc<Upstreams>,
    config: Arc<Config>,
    runner: Arc<dyn JobRunner>,
    /// Other instances seen alive or not, and when.
    liveness: std::sync::Mutex<std::collections::HashMap<String, (Instant, bool)>>,
}

/// A claimed job, and how to acknowledge it.
pub(super) struct Claim {
    pub(super) tenant: usize,
    pub(super) head: Entry,
    /// This instance's processing list (Redis).
    pub(super) processing: String,
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
            liveness: std::sync::Mutex::default(),
        }
    }

    /// The head of `tenant`'s queue and the queue's length.
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

    /// What the instance holding `tenant`'s head last said it waits for
    /// ([`Overflow::mark_head_waits`]); nothing when the mark cannot be read
    /// (a Redis user without `GET`, a key of another type): the head then
    /// holds nobody up, as before marks.
    async fn head_mark(&self, tenant: usize) -> Option<String> {
        let o = &self.overflow;
        let r = o.inner.redis.as_ref()?;
        let mut conn = r.conn()?;
        let mut get = redis::cmd("GET");
        get.arg(o.key(tenant, HEAD_WAITS));
        match tokio::time::timeout(r.timeout, get.query_async::<Option<String>>(&mut conn)).await {
            Ok(Ok(mark)) => mark,
            Ok(Err(e)) => {
                metrics::REDIS_ERRORS.with_label_values(&["overflow"]).inc();
                static WARNED: std::sync::atomic::AtomicBool =
                    std::sync::atomic::AtomicBool::new(false);
                if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    warn!(error = %e, "overflow queue: cannot read which limit another instance's parked request waits for (does the Redis user allow GET?); newcomers are not held behind it");
                }
                None
            }
            Err(_) => None,
        }
    }

    /// Tries the head of one tenant's queue.
    async fn visit(&self, tenant: usize, running: &mut JoinSet<()>) -> Visit {
        let o = &self.overflow;
        let heads = self.heads(tenant).await;
        metrics::OVERFLOW_PARKED
            .with_label_values(&[&o.inner.tenant_ids[tenant]])
            .set(heads.as_ref().map_or(0, |(_, len)| *len as i64));
        let Some((head, _)) = heads else {
            o.set_head_waits(tenant, None);
            return Visit::Empty;
        };
        match &head {
            Entry::Sync {
                id,
                tokens,
                deadline_ms,
                owner,
            } => {
                if owner != &o.inner.instance {
                    // Another instance's client: it admits its own, unless
                    // the entry cannot be live (its deadline passed or lies
                    // further out than any wait, or its instance stopped
                    // beating): then it would block the queue for everyone.
                    let now = unix_ms();
                    let longest = (o.settings(tenant).max_wait + o.inner.jobs.visibility_timeout)
                        .as_millis() as u64;
                    if *deadline_ms < now
                        || *deadline_ms > now.saturating_add(longest)
                        || !self.is_alive(tenant, owner).await
                    {
                        o.remove(tenant, &head).await;
                        return Visit::Served;
                    }
                    let mark = self.head_mark(tenant).await;
                    let Some(limit) = marked_limit(mark.as_deref(), id) else {
                        // Its instance has not said it waits for the limits:
                        // it may wait for a backend there, or that instance
                        // may be frozen. Nobody here waits behind it.
                        o.set_head_waits(tenant, None);
                        return self.look_past(tenant, Visit::Blocked).await;
                    };
                    // It waits for the tenant's limits there: newcomers
                    // here queue behind it.
                    o.set_head_waits(tenant, Some(limit));
                    return Visit::Blocked;
                }
                match self
                    .try_parked(tenant, &head, id, *tokens, *deadline_ms)
                    .await
                {
                    Tried::Served => Visit::Served,
                    Tried::Blocked => Visit::Blocked,
                    Tried::NoBackend => {
                        o.set_head_waits(tenant, None);
                        self.look_past(tenant, Visit::Blocked).await
                    }
                }
            }
            Entry::Async { id } => self.try_job(tenant, &head, id, running).await,
        }
    }

    /// Tries to admit `entry`, a request parked on this instance (`id`,
    /// `tokens` and `deadline_ms` are its own).
    async fn try_parked(
        &self,
        tenant: usize,
        entry: &Entry,
        id: &str,
        tokens: u64,
        deadline_ms: u64,
    ) -> Tried {
        let o = &self.overflow;
        let route = lock(&o.inner.waiters).get(id).map(|w| w.route);
        let Some(route) = route.filter(|_| deadline_ms >= unix_ms()) else {
            // Its client timed out or left: drop it.
            o.remove(tenant, entry).await;
            return Tried::Served;
        };
        if route >= self.config.models.len() {
            o.remove(tenant, entry).await;
            return Tried::Served;
        }
        if !self
            .upstreams
            .can_serve_any(&self.config.routes_for(tenant, route))
        {
            return Tried::NoBackend;
        }
        let admitted = match self.limiter.admit(tenant, tokens).await {
            Ok(grant) => Ok(grant),
            // The budget ran out while it waited: no wait in the queue
            // mends that, so it is answered now, as a newcomer would be (and
            // the next head likewise).
            Err(refusal) if refusal.limit == LimitKind::Budget => {
                // Newcomers are refused by the budget directly, not queued.
                o.set_head_waits(tenant, None);
                Err(refusal)
            }
            Err(refusal) => {
                let waits = waits_for_limits(&refusal);
                o.set_head_waits(tenant, waits);
                if let Some(limit) = waits {
                    o.mark_head_waits(tenant, id, limit).await;
                }
                return Tried::Blocked;
            }
        };
        o.remove(tenant, entry).await;
        let waiter = o.take_waiter(id);
        if let Some(Err(Ok(grant))) = waiter.map(|w| w.admit.send(admitted)) {
            // The client left at the last moment.
            self.limiter.release(grant).await;
        }
        Tried::Served
    }

    /// The head of `tenant`'s queue waits for something other than the
    /// tenant's limits (a backend for its model, a job slot): the first
    /// request parked here behind it, within [`LOOK_PAST`] entries, whose
    /// model can be served takes the turn, so that one model's outage or a
    /// backlog of jobs does not hold up the tenant's other requests until
    /// they wait out `max_wait`. Else `otherwise`, the head's own visit.
    async fn look_past(&self, tenant: usize, otherwise: Visit) -> Visit {
        let o = &self.overflow;
        for entry in self.behind_head(tenant).await {
            let Entry::Sync {
                id,
                tokens,
                deadline_ms,
                owner,
            } = &entry
            else {
                // A job is claimed from the head only.
                continue;
            };
            if owner != &o.inner.instance {
                // Its own instance's drain looks past the head likewise.
                continue;
            }
            match self
                .try_parked(tenant, &entry, id, *tokens, *deadline_ms)
                .await
            {
                Tried::Served => return Visit::Served,
                Tried::Blocked => return Visit::Blocked,
                Tried::NoBackend => {}
            }
        }
        otherwise
    }

    /// Up to [`LOOK_PAST`] entries after the head of `tenant`'s queue, in
    /// order (what cannot be read is left out).
    async fn behind_head(&self, tenant: usize) -> Vec<Entry> {
        let o = &self.overflow;
        if o.inner.redis.is_some() {
            let raw: Option<Vec<String>> = o
                .redis(
                    redis::cmd("LRANGE")
                        .arg(o.key(tenant, "queue"))
                        .arg(1)
                        .arg(LOOK_PAST),
                )
                .await;
            return raw
                .unwrap_or_default()
                .iter()
                .filter_map(|raw| Entry::decode(raw))
                .collect();
        }
        let local = lock(&o.inner.local);
        local.queues.get(&tenant).map_or_else(Vec::new, |queue| {
            queue.iter().skip(1).take(LOOK_PAST).cloned().collect()
        })
    }

    /// Claims the job at the head of `tenant`'s queue: `None` when there is
    /// nothing to run (someone else's, already done, gone); else the job as
    /// stored (`Err` when it cannot be read).
    async fn claim(&self, claim: &Claim, id: &str) -> Option<Result<Job, String>> {
        let o = &self.overflow;
        let tenant = claim.tenant;
        if o.inner.redis.is_none() {
            let pending = match lock(&o.inner.local).jobs.get(id) {
                Some(job) if job.pending() => Some(job.job.clone()),
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
                o.requeue_claim(claim).await;
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
                // Already over (a re-queued duplicate, cancelled) or gone:
                // acknowledge.
                o.acknowledge(claim).await;
                None
            }
            Some((Some(request), None)) => Some(
                serde_json::from_str::<Job>(&request)
                    .map_err(|e| e.to_string())
                    .and_then(|job| {
                        // Stored under one id, claiming another: it would
                        // write its result over someone else's.
                        if job.id == id {
                            Ok(job)
                        } else {
                            Err(format!("the stored job names the id {:?}", job.id))
                        }
                    }),
            ),
            None => {
                o.requeue_claim(claim).await;
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

    async fn try_job(
        &self,
        tenant: usize,
        head: &Entry,
        id: &str,
        running: &mut JoinSet<()>,
    ) -> Visit {
        let o = &self.overflow;
        if running.len() >= self.config.jobs.concurrency {
            o.set_head_waits(tenant, None);
            return self.look_past(tenant, Visit::NoSlot).await;
        }
        let claim = Claim {
            tenant,
            head: head.clone(),
            processing: o.key(tenant, &format!("processing:{}", o.inner.instance)),
        };
        let job = match self.claim(&claim, id).await {
            None => return Visit::Served,
            Some(Ok(job)) => job,
            Some(Err(why)) => {
                warn!(job = %id, error = %why, "a stored job cannot be read; it fails");
                let result = JobResult::failed(&ApiError::internal(
                    "The stored job could not be read; it was not run.",
                ));
                o.finish_job(&claim, id, &result).await;
                return Visit::Served;
            }
        };
        let max_age = self.config.jobs.max_age;
        let expired = unix_ms() > job.created_ms.saturating_add(max_age.as_millis() as u64);
        let route = match self.resolve(tenant, &job) {
            Ok(_) if expired => Err(ApiError::job_expired(max_age)),
            resolved => resolved,
        };
        let route = match route {
            Ok(route) => route,
            Err(error) => {
                warn!(job = %id, tenant = %job.tenant, model = %job.model, code = error.code, "a job can no longer run as submitted; it fails");
                let result = JobResult::failed(&error);
                o.finish_job(&claim, id, &result).await;
                if job.tenant == o.inner.tenant_ids[tenant] {
                    o.send_callback(self.runner.clone(), tenant, job, result);
                }
                return Visit::Served;
            }
        };
        if !self
            .upstreams
            .can_serve_any(&self.config.routes_for(tenant, route))
        {
            o.requeue_claim(&claim).await;
            o.set_head_waits(tenant, None);
            return self.look_past(tenant, Visit::Blocked).await;
        }
        let grant = match self.limiter.admit(tenant, job.tokens).await {
            Ok(grant) => grant,
            Err(refusal) => {
                o.requeue_claim(&claim).await;
                o.set_head_waits(tenant, waits_for_limits(&refusal));
                if refusal.limit == LimitKind::Budget {
                    // The job waits for the next period (or a raised
                    // budget); the requests parked behind it are answered
                    // by the budget now rather than wait out `max_wait`.
                    return self.look_past(tenant, Visit::Blocked).await;
                }
                return Visit::Blocked;
            }
        };
        let Some(number) = o.start_attempt(&claim, id).await else {
            self.limiter.release(grant).await;
            return Visit::Served;
        };
        let (stop, cancel) = tokio::sync::watch::channel(false);
        lock(&o.inner.running).insert(id.to_string(), (tenant, stop));
        let control = AttemptControl {
            number,
            deadline: tokio::time::Instant::now() + self.config.jobs.timeout,
            cancel,
        };
        let overflow = o.clone();
        let runner = self.runner.clone();
        let settings = self.config.jobs;
        running.spawn(async move {
            // Run on a task of its own so that a panic fails this job alone
            // (its grant is released by its drop guard) and is answered.
            let run = {
                let (runner, job) = (runner.clone(), job.clone());
                tokio::spawn(
                    async move { runner.run_job(&job, tenant, route, grant, control).await },
                )
            };
            let attempt = match run.await {
                Ok(attempt) => attempt,
                Err(e) => {
                    error!(job = %job.id, error = %e, "an async job's run failed inside the gateway");
                    Attempt {
                        result: JobResult::failed(&ApiError::internal(
                            "The gateway failed while running the job.",
                        )),
                        ended: Ended::Final,
                    }
                }
            };
            lock(&overflow.inner.running).remove(&job.id);
            overflow
                .end_attempt(runner, &settings, &claim, &job, number, attempt)
                .await;
        });
        Visit::Served
    }

    /// Tells the jobs running here that their tenant cancelled them on
    /// another instance.
    async fn look_for_cancels(&self) {
        let o = &self.overflow;
        if o.inner.redis.is_none() {
            return;
        }
        let ids: Vec<(String, usize)> = lock(&o.inner.running)
            .iter()
            .map(|(id, (tenant, _))| (id.clone(), *tenant))
            .collect();
        for (id, tenant) in ids {
            if o.cancel_requested(tenant, &id).await {
                if let Some((_, stop)) = lock(&o.inner.running).get(&id) {
                    let _ = stop.send(true);
                }
            }
        }
    }

    /// Whether another instance still beats for `tenant` (its heartbeat
    /// key exists); asked at most once a second per instance.
    async fn is_alive(&self, tenant: usize, instance: &str) -> bool {
        let now = Instant::now();
        if let Some((at, alive)) = lock(&self.liveness).get(instance) {
            if now.duration_since(*at) < Duration::from_secs(1) {
                return *alive;
            }
        }
        let o = &self.overflow;
        let exists: Option<i64> = o
            .redis(redis::cmd("EXISTS").arg(o.key(tenant, &format!("worker:{instance}"))))
            .await;
        // Redis not answering says nothing about the instance.
        let alive = exists != Some(0);
        let mut liveness = lock(&self.liveness);
        if liveness.len() > 1024 {
            liveness.clear();
        }
        liveness.insert(instance.to_string(), (now, alive));
        alive
    }

    /// Heartbeats for this instance and re-queues what silent ones held.
    async fn keep_claims(&self) {
        let o = &self.overflow;
        if o.inner.redis.is_none() {
            return;
        }
        let ttl = o.inner.jobs.visibility_timeout.as_millis() as u64;
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

    /// Warns when Redis may evict queued jobs. Best effort: an ACL user
    /// without `CONFIG` (as docs/operations.md advises) cannot ask, and that
    /// is no Redis failure.
    async fn warn_if_redis_may_evict(&self) {
        let Some(r) = self.overflow.inner.redis.as_ref() else {
            return;
        };
        let Some(mut conn) = r.conn() else {
            return;
        };
        let asked = tokio::time::timeout(
            r.timeout,
            redis::cmd("CONFIG")
                .arg("GET")
                .arg("maxmemory-policy")
                .query_async::<Vec<String>>(&mut conn),
        )
        .await;
        match asked {
            Ok(Ok(policy)) => {
                if let Some(policy) = policy.get(1).filter(|p| *p != "noeviction") {
                    warn!(%policy, "Redis maxmemory-policy may evict queued jobs; set it to noeviction (and appendonly yes) for durable async jobs");
                }
            }
            Ok(Err(_)) => {
                info!("cannot read Redis maxmemory-policy (CONFIG not allowed here); make sure it is noeviction for durable async jobs");
            }
            Err(_) => {}
        }
    }

    /// Visits `tenant`'s queue head until it has taken `share` of them or
    /// one must wait: how many it took, and how the last visit went.
    async fn take_turn(
        &self,
        tenant: usize,
        share: u32,
        running: &mut JoinSet<()>,
    ) -> (u32, Visit) {
        let mut took = 0;
        while took < share {
            // A fault in one tenant's queue must not stop the drain for
            // every tenant.
            let visit = AssertUnwindSafe(self.visit(tenant, running))
                .catch_unwind()
                .await
                .unwrap_or_else(|_| {
                    error!(tenant = %self.overflow.inner.tenant_ids[tenant], "the overflow drain failed on a queue head; going on");
                    Visit::Blocked
                });
            if visit != Visit::Served {
                return (took, visit);
            }
            took += 1;
        }
        (took, Visit::Served)
    }

    /// Runs until `shutdown` turns true: drains the queues, then waits for
    /// the jobs already running (the caller bounds that by its grace
    /// period).
    pub async fn run(&self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        self.warn_if_redis_may_evict().await;
        let o = &self.overflow;
        let tenants = o.inner.tenant_ids.len();
        let mut turns = Turns::new(o.inner.settings.iter().map(|s| s.weight).collect());
        let mut next_claims = Instant::now();
        let mut next_promote = Instant::now();
        let mut next_cancel_poll = Instant::now();
        let mut next_restore = Instant::now() + RESTORE_EVERY;
        let mut running = JoinSet::new();
        let mut next_round = Instant::now();
        loop {
            let now = Instant::now();
            if now >= next_claims {
                self.keep_claims().await;
                next_claims = Instant::now() + o.inner.jobs.visibility_timeout / 3;
            }
            if now >= next_promote {
                for tenant in 0..tenants {
                    o.promote_due(tenant).await;
                }
                next_promote = Instant::now() + PROMOTE_EVERY;
            }
            if now >= next_restore {
                o.restore_places().await;
                next_restore = Instant::now() + RESTORE_EVERY;
            }
            if now >= next_cancel_poll {
                self.look_for_cancels().await;
                next_cancel_poll = Instant::now() + CANCEL_POLL;
            }
            while running.try_join_next().is_some() {}
            let due = o.take_due();
            if due.is_empty() || Instant::now() >= next_round {
                // Each tenant in turn takes up to its weight of heads.
                let mut busy = false;
                let mut stopped = None;
                for (tenant, share) in turns.round() {
                    let (took, last) = self.take_turn(tenant, share, &mut running).await;
                    match last {
                        Visit::Blocked => busy = true,
                        Visit::NoSlot => {
                            busy = true;
                            stopped.get_or_insert((tenant, took));
                        }
                        Visit::Empty | Visit::Served => {}
                    }
                    busy |= took > 0;
                }
                turns.end_round(stopped);
                next_round = Instant::now() + if busy { TICK } else { IDLE_TICK };
            } else {
                // A request of these tenants ended while some of theirs were
                // parked here, or one parked: their heads take the room now
                // (the others wait for the next round).
                for tenant in due {
                    let (took, last) = self
                        .take_turn(tenant, turns.share(tenant), &mut running)
                        .await;
                    if took > 0 || last != Visit::Empty {
                        // Work is queued: look again within a tick.
                        next_round = next_round.min(Instant::now() + TICK);
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep_until(next_round.into()) => {}
                _ = o.inner.wake.notified() => {}
                _ = shutdown.changed() => {
                    // Parked requests get their answer now: nothing will
                    // admit them.
                    o.dismiss_waiters();
                    // Stop claiming; let the jobs already running finish
                    // (Pingora bounds this by the grace period). A job cut
                    // off anyway stays claimed and is re-queued by another
                    // instance after the visibility timeout.
                    if !running.is_empty() {
                        info!(jobs = running.len(), "waiting for running async jobs before stopping");
                    }
                    while running.join_next().await.is_some() {}
                    o.callbacks_sent().await;
                    return;
                }
                Some(_) = running.join_next(), if !running.is_empty() => {}
            }
        }
    }
}

/// Whether a head the limiter refused waits for the tenant's limits (and
/// newcomers should queue behind it): for a request or a concurrent slot,
/// each a unit any request takes alike. Not for tokens: a head that
/// reserves most of the minute would hold every smaller request up until
/// the whole minute is free. Not when the budget is spent: no wait in the
/// queue mends that.
fn waits_for_limits(refusal: &crate::limits::Refusal) -> Option<LimitKind> {
    matches!(refusal.limit, LimitKind::Requests | LimitKind::Concurrency).then_some(refusal.limit)
}

/// The key (per tenant, Redis) where the instance holding a sync head says
/// which limit it waits for: `id|limit`, for a second.
const HEAD_WAITS: &str = "head_waits";

/// The limit `mark` (the [`HEAD_WAITS`] key) says the head `id` waits for.
fn marked_limit(mark: Option<&str>, id: &str) -> Option<LimitKind> {
    let (marked, limit) = mark?.split_once('|')?;
    (marked == id)
        .then(|| LimitKind::from_label(limit))
        .flatten()
}

impl Overflow {
    /// Tells the other instances (Redis) that the request `id`, parked here,
    /// waits for the tenant's `limit`: their newcomers queue behind it. Said
    /// again at each visit; it lapses after a second unsaid (the instance
    /// stopped or froze).
    async fn mark_head_waits(&self, tenant: usize, id: &str, limit: LimitKind) {
        if self.inner.redis.is_none() {
            return;
        }
        let _: Option<()> = self
            .redis(
                redis::cmd("SET")
                    .arg(self.key(tenant, HEAD_WAITS))
                    .arg(format!("{id}|{}", limit.label()))
                    .arg("PX")
                    .arg(1000),
            )
            .await;
    }

    /// Puts a claimed head back at the head of its queue.
    pub(super) async fn requeue_claim(&self, claim: &Claim) {
        let o = self;
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
    pub(super) async fn acknowledge(&self, claim: &Claim) {
        let _: Option<i64> = self
            .redis(
                redis::cmd("LREM")
                    .arg(&claim.processing)
                    .arg(1)
                    .arg(claim.head.encode()),
            )
            .await;
    }

    /// Ends an attempt: the job is done (and its callback delivered),
    /// cancelled, or put back for another attempt after a backoff while
    /// attempts and its age allow.
    async fn end_attempt(
        &self,
        runner: Arc<dyn JobRunner>,
        settings: &crate::config::JobSettings,
        claim: &Claim,
        job: &Job,
        number: u32,
        attempt: Attempt,
    ) {
        let tenant = claim.tenant;
        match attempt.ended {
            Ended::Cancelled => return self.finish_cancelled(claim, &job.id).await,
            Ended::TimedOut => self.count_job(tenant, "timed_out"),
            Ended::Final | Ended::Retryable => {}
        }
        if attempt.ended != Ended::Final && number < settings.max_attempts {
            let next = unix_ms() + super::retry::backoff(settings, number).as_millis() as u64;
            let deadline = job
                .created_ms
                .saturating_add(settings.max_age.as_millis() as u64);
            if next <= deadline {
                info!(job = %job.id, attempt = number, status = attempt.result.status, "a job's attempt failed; it runs again after a backoff");
                return self.retry_job(claim, &job.id, next).await;
            }
        }
        self.finish_job(claim, &job.id, &attempt.result).await;
        self.send_callback(runner, tenant, job.clone(), attempt.result);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mark_names_its_head_and_limit() {
        assert_eq!(
            marked_limit(Some("abc|concurrency"), "abc"),
            Some(LimitKind::Concurrency)
        );
        assert_eq!(
            marked_limit(Some("abc|rpm"), "abc"),
            Some(LimitKind::Requests)
        );
        assert_eq!(marked_limit(Some("abc|rpm"), "abd"), None);
        assert_eq!(marked_limit(Some("abc|nonsense"), "abc"), None);
        assert_eq!(marked_limit(Some("abc"), "abc"), None);
        assert_eq!(marked_limit(None, "abc"), None);
    }
}
