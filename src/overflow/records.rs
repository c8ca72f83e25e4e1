//! Where jobs are kept and how their records change: submitting (once per
//! idempotency key), looking up, listing, cancelling, starting an attempt
//! and ending one (done, tried again later, cancelled).
//!
//! With Redis a job is a hash `{prefix}:{tenant}:job:{id}` (`request`,
//! `state`, `result`, `attempts`, `next_at`, `cancel`, and `model`,
//! `endpoint`, `created`, `code` for listing without reading bodies); the
//! tenant's index `{prefix}:{tenant}:jobs` (a sorted set by submission
//! time) lists them, `{prefix}:{tenant}:delayed` holds jobs waiting out a
//! backoff (scored by when they may run again), and
//! `{prefix}:{tenant}:idem:{sha256 of the key}` names the job of an
//! idempotency key. Every key of a tenant shares its hash tag, so the
//! scripts below are atomic in a Redis Cluster too. Without Redis the same
//! happens in the in-process store.

use super::drain::Claim;
use super::jobs::{Job, JobResult, JobState, JobView, Submitted};
use super::local_jobs::LocalJobs;
use super::queue::Entry;
use super::{unix_ms, Overflow, ParkRefusal};
use crate::lock;
use crate::metrics;
use crate::openai::ApiError;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};
use tracing::warn;

/// Index entries one page of a list may look at (a status filter can
/// skip many).
const LIST_SCAN: usize = 2000;

/// How long `DELETE` waits for a running job to stop.
const CANCEL_WAIT: Duration = Duration::from_secs(5);

/// In-process queues and jobs (no Redis): not durable.
pub(super) struct LocalState {
    pub(super) queues: HashMap<usize, VecDeque<Entry>>,
    pub(super) jobs: LocalJobs,
    /// Jobs waiting out a backoff: (when they may run, tenant, entry).
    pub(super) delayed: Vec<(u64, usize, Entry)>,
}

/// One page of a tenant's jobs, newest first.
#[derive(Debug, Default)]
pub struct JobPage {
    /// The jobs (without their answers).
    pub jobs: Vec<JobView>,
    /// More jobs may follow: ask again with `after` = `cursor`.
    pub has_more: bool,
    /// The last job looked at (the last of `jobs`, or further when a
    /// status filter skipped some).
    pub cursor: Option<String>,
}

/// Why a list could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListRefusal {
    /// The `after` cursor names no job of the tenant (any more).
    UnknownCursor,
    /// The store cannot be reached.
    Unavailable,
}

/// Submits a job: 1 queued, 0 queue full, or the job id and fingerprint
/// an idempotency key already names ("id fingerprint").
const SUBMIT: &str = r"
if ARGV[9] == '1' then
  local prior = redis.call('GET', KEYS[4])
  if prior then
    -- A key whose job is gone (expired, evicted) names nothing: it is
    -- taken again. The job's hash shares the tenant's hash tag.
    local id = string.match(prior, '^(%S+)')
    if id and redis.call('EXISTS', ARGV[13] .. id) == 1 then return prior end
  end
end
if redis.call('LLEN', KEYS[2]) >= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 'request', ARGV[3], 'state', 'queued', 'attempts', '0',
  'model', ARGV[10], 'endpoint', ARGV[11], 'created', ARGV[8])
redis.call('EXPIRE', KEYS[1], ARGV[7])
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[8], ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. ARGV[12])
redis.call('EXPIRE', KEYS[3], ARGV[7])
if ARGV[9] == '1' then
  redis.call('SET', KEYS[4], ARGV[4] .. ' ' .. ARGV[5], 'EX', ARGV[6])
end
return 1
";

/// Starts an attempt: its number, or -1 when the job may not run (done,
/// cancelled, gone), -2 when a cancel asked while it last ran took effect.
const START: &str = r"
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'queued' and state ~= 'running' then return -1 end
if redis.call('HEXISTS', KEYS[1], 'cancel') == 1 then
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'result', ARGV[1], 'code', ARGV[2])
  redis.call('HDEL', KEYS[1], 'next_at', 'cancel')
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  return -2
end
redis.call('HSET', KEYS[1], 'state', 'running')
redis.call('HDEL', KEYS[1], 'next_at')
return redis.call('HINCRBY', KEYS[1], 'attempts', 1)
";

/// Cancels a job: '' when there is none, 'over' when it had already
/// ended, 'running' when its instance must stop it, else 'cancelled'.
const CANCEL: &str = r"
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return '' end
if state == 'done' or state == 'cancelled' then return 'over' end
if state == 'running' then
  redis.call('HSET', KEYS[1], 'cancel', '1')
  return 'running'
end
redis.call('LREM', KEYS[2], 0, ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HSET', KEYS[1], 'state', 'cancelled', 'result', ARGV[2], 'code', ARGV[3])
redis.call('HDEL', KEYS[1], 'next_at')
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 'cancelled'
";

/// Ends an attempt and acknowledges its claim: ARGV[1] `done` or
/// `cancelled` (with its result), or `queued` for another attempt at
/// ARGV[2] (it joins the backoff set), unless a cancel was asked meanwhile:
/// then the job ends `cancelled`. Returns the state written.
const END: &str = r"
local state = ARGV[1]
if state == 'queued' and redis.call('HEXISTS', KEYS[1], 'cancel') == 1 then
  state = 'cancelled'
end
if state == 'queued' then
  redis.call('HSET', KEYS[1], 'state', 'queued', 'next_at', ARGV[2])
  redis.call('EXPIRE', KEYS[1], ARGV[6])
  redis.call('ZADD', KEYS[3], ARGV[2], ARGV[3])
else
  local result, code = ARGV[4], ARGV[5]
  if state == 'cancelled' then result, code = ARGV[7], ARGV[8] end
  redis.call('HSET', KEYS[1], 'result', result, 'state', state, 'code', code)
  redis.call('HDEL', KEYS[1], 'next_at', 'cancel')
  redis.call('EXPIRE', KEYS[1], ARGV[9])
end
redis.call('LREM', KEYS[2], 1, ARGV[3])
return state
";

/// Moves the jobs whose backoff is over to the tail of their queue.
const PROMOTE: &str = r"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 100)
for _, entry in ipairs(due) do
  redis.call('RPUSH', KEYS[2], entry)
  redis.call('ZREM', KEYS[1], entry)
end
return #due
";

/// The stored form of a cancelled job's answer.
fn cancelled_result() -> JobResult {
    JobResult::failed(&ApiError::job_cancelled())
}

/// A job's hash fields as read: state, then `code` (listing) or `result`
/// (one job), attempts, next_at, model, endpoint, created.
type Fields<T> = (
    Option<String>,
    Option<T>,
    Option<u32>,
    Option<u64>,
    Option<String>,
    Option<String>,
    Option<u64>,
);
type Listed = Fields<u16>;

fn listed_view(id: &str, fields: Listed) -> Option<JobView> {
    let (state, code, attempts, next_at, model, endpoint, created) = fields;
    let state = match state?.as_str() {
        "running" => JobState::Running,
        "cancelled" => JobState::Cancelled,
        "done" => JobState::Done(JobResult {
            status: code.unwrap_or(200),
            body: String::new(),
        }),
        _ => JobState::Queued(None),
    };
    Some(JobView {
        id: id.to_string(),
        state,
        model: model.unwrap_or_default(),
        endpoint: endpoint.unwrap_or_default(),
        created_ms: created.unwrap_or(0),
        attempts: attempts.unwrap_or(0),
        next_attempt_ms: next_at,
    })
}

impl Overflow {
    /// Counts a job outcome in `runestone_jobs_total`.
    pub(super) fn count_job(&self, tenant: usize, outcome: &str) {
        metrics::JOBS_TOTAL
            .with_label_values(&[&self.inner.tenant_ids[tenant], outcome])
            .inc();
    }

    fn job_key(&self, tenant: usize, id: &str) -> String {
        self.key(tenant, &format!("job:{id}"))
    }

    /// Stores an async job of `tenant` (its index) and queues it, unless
    /// its idempotency key already names a job of the tenant.
    pub async fn submit(&self, tenant: usize, job: Job) -> Result<Submitted, ParkRefusal> {
        let submitted = if self.inner.redis.is_some() {
            self.submit_redis(tenant, &job).await
        } else {
            self.submit_local(tenant, job)
        };
        match &submitted {
            Ok(Submitted::Created(_)) => {
                self.count_job(tenant, "submitted");
                self.inner.wake.notify_one();
            }
            Ok(Submitted::Existing(_)) => self.count_job(tenant, "deduplicated"),
            Ok(Submitted::KeyReused) => {}
            Err(why) => self.count_park_refusal(tenant, *why),
        }
        submitted
    }

    async fn submit_redis(&self, tenant: usize, job: &Job) -> Result<Submitted, ParkRefusal> {
        let r = self.inner.redis.as_ref().ok_or(ParkRefusal::Unavailable)?;
        let ttl = self.inner.jobs.result_ttl.as_secs();
        let kept = ttl * 7;
        let oldest = unix_ms().saturating_sub(kept * 1000);
        let idempotency = job.idempotency_key.as_deref();
        let script = redis::Script::new(SUBMIT);
        let mut invocation = script.key(self.job_key(tenant, &job.id));
        invocation
            .key(self.key(tenant, "queue"))
            .key(self.key(tenant, "jobs"))
            .key(self.key(tenant, &format!("idem:{}", idempotency.unwrap_or("-"))))
            .arg(Entry::Async { id: job.id.clone() }.encode())
            .arg(self.inner.settings[tenant].max_parked)
            .arg(serde_json::to_string(job).unwrap_or_default())
            .arg(&job.id)
            .arg(&job.fingerprint)
            .arg(self.inner.jobs.idempotency_window.as_secs().max(1))
            .arg(kept)
            .arg(job.created_ms)
            .arg(if idempotency.is_some() { "1" } else { "0" })
            .arg(&job.model)
            .arg(&job.endpoint)
            .arg(oldest)
            .arg(self.job_key(tenant, ""));
        let mut conn = r.conn().ok_or(ParkRefusal::Unavailable)?;
        let answer = tokio::time::timeout(
            r.timeout,
            invocation.invoke_async::<redis::Value>(&mut conn),
        )
        .await;
        match answer {
            Ok(Ok(redis::Value::Int(1))) => Ok(Submitted::Created(job.id.clone())),
            Ok(Ok(redis::Value::Int(_))) => Err(ParkRefusal::Full),
            Ok(Ok(redis::Value::BulkString(prior))) => {
                let prior = String::from_utf8_lossy(&prior);
                Ok(match prior.split_once(' ') {
                    Some((id, fingerprint)) if fingerprint == job.fingerprint => {
                        Submitted::Existing(id.to_string())
                    }
                    _ => Submitted::KeyReused,
                })
            }
            Ok(Ok(other)) => {
                warn!(answer = ?other, "job submission: Redis answered something unexpected");
                Err(ParkRefusal::Unavailable)
            }
            Ok(Err(e)) => {
                metrics::REDIS_ERRORS.with_label_values(&["overflow"]).inc();
                warn!(error = %e, "job submission: Redis call failed");
                // Sent and then lost (a timeout, a dropped connection): it
                // may still have run.
                if e.is_timeout() || e.is_connection_dropped() || e.is_io_error() {
                    Err(ParkRefusal::Unconfirmed)
                } else {
                    Err(ParkRefusal::Unavailable)
                }
            }
            Err(_) => {
                // Sent, but not answered in time: it may still run.
                metrics::REDIS_ERRORS.with_label_values(&["overflow"]).inc();
                Err(ParkRefusal::Unconfirmed)
            }
        }
    }

    fn submit_local(&self, tenant: usize, job: Job) -> Result<Submitted, ParkRefusal> {
        let mut local = lock(&self.inner.local);
        let now = Instant::now();
        local.jobs.sweep(now);
        if let Some(found) = local.jobs.by_key(&job, now) {
            return Ok(found);
        }
        let max = self.inner.settings[tenant].max_parked;
        if local.queues.get(&tenant).map_or(0, VecDeque::len) >= max {
            return Err(ParkRefusal::Full);
        }
        let id = job.id.clone();
        local
            .jobs
            .insert(job, now)
            .map_err(ParkRefusal::StoreFull)?;
        local
            .queues
            .entry(tenant)
            .or_default()
            .push_back(Entry::Async { id: id.clone() });
        Ok(Submitted::Created(id))
    }

    /// The tenant's job `id` with its answer when done; `None` when it has
    /// no such job (another tenant's job is not found either).
    pub async fn job(&self, tenant: usize, id: &str) -> Result<Option<JobView>, ParkRefusal> {
        if self.inner.redis.is_none() {
            let mut local = lock(&self.inner.local);
            local.jobs.sweep(Instant::now());
            let Some(job) = local.jobs.get(id) else {
                return Ok(None);
            };
            if job.job.tenant != self.inner.tenant_ids[tenant] {
                return Ok(None);
            }
            let position = local.queues.get(&tenant).and_then(|q| {
                q.iter()
                    .position(|e| matches!(e, Entry::Async { id: j } if j == id))
                    .map(|p| p + 1)
            });
            return Ok(Some(job.view(position)));
        }
        let fields: Option<Fields<String>> = self
            .redis(
                redis::cmd("HMGET")
                    .arg(self.job_key(tenant, id))
                    .arg("state")
                    .arg("result")
                    .arg("attempts")
                    .arg("next_at")
                    .arg("model")
                    .arg("endpoint")
                    .arg("created"),
            )
            .await;
        let (state, result, attempts, next_at, model, endpoint, created) =
            fields.ok_or(ParkRefusal::Unavailable)?;
        // The job as a list shows it, then its answer or its place in the
        // queue.
        let word = state.clone().unwrap_or_default();
        let listed = (state, None, attempts, next_at, model, endpoint, created);
        let Some(mut view) = listed_view(id, listed) else {
            return Ok(None);
        };
        view.state = match (word.as_str(), result) {
            ("cancelled", _) => JobState::Cancelled,
            (_, Some(result)) => {
                JobState::Done(serde_json::from_str(&result).unwrap_or_else(|_| {
                    JobResult::failed(&ApiError::internal(
                        "The job's stored result cannot be read.",
                    ))
                }))
            }
            ("running", None) => JobState::Running,
            (_, None) if next_at.is_some() => JobState::Queued(None),
            (_, None) => {
                let position: Option<Option<i64>> = self
                    .redis(
                        redis::cmd("LPOS")
                            .arg(self.key(tenant, "queue"))
                            .arg(Entry::Async { id: id.to_string() }.encode()),
                    )
                    .await;
                JobState::Queued(position.flatten().map(|p| p.max(0) as usize + 1))
            }
        };
        Ok(Some(view))
    }

    /// Up to `limit` of the tenant's jobs, newest first, after the job
    /// `after`, with status `status` (`queued`, `running`, `completed`,
    /// `failed`, `cancelled`) or any.
    pub async fn list_jobs(
        &self,
        tenant: usize,
        status: Option<&str>,
        limit: usize,
        after: Option<&str>,
    ) -> Result<JobPage, ListRefusal> {
        let wanted = |view: &JobView| status.is_none_or(|s| view.status() == s);
        if self.inner.redis.is_none() {
            let mut local = lock(&self.inner.local);
            local.jobs.sweep(Instant::now());
            let jobs = local.jobs.of_tenant(&self.inner.tenant_ids[tenant]);
            let start = match after {
                None => 0,
                Some(after) => {
                    jobs.iter()
                        .position(|j| j.job.id == after)
                        .ok_or(ListRefusal::UnknownCursor)?
                        + 1
                }
            };
            let mut page = JobPage::default();
            for (scanned, job) in jobs[start..].iter().enumerate() {
                if page.jobs.len() == limit || scanned == LIST_SCAN {
                    page.has_more = true;
                    break;
                }
                page.cursor = Some(job.job.id.clone());
                // Positions are not worked out for a list.
                let view = job.view(None);
                if wanted(&view) {
                    page.jobs.push(view);
                }
            }
            return Ok(page);
        }
        let index = self.key(tenant, "jobs");
        let mut start = match after {
            None => 0,
            Some(after) => {
                let rank: Option<Option<u64>> = self
                    .redis(redis::cmd("ZREVRANK").arg(&index).arg(after))
                    .await;
                rank.ok_or(ListRefusal::Unavailable)?
                    .ok_or(ListRefusal::UnknownCursor)?
                    + 1
            }
        };
        let mut page = JobPage::default();
        let mut scanned = 0;
        'scan: loop {
            let batch = 100;
            let ids: Vec<String> = self
                .redis(
                    redis::cmd("ZREVRANGE")
                        .arg(&index)
                        .arg(start)
                        .arg(start + batch - 1),
                )
                .await
                .ok_or(ListRefusal::Unavailable)?;
            if ids.is_empty() {
                break;
            }
            start += ids.len() as u64;
            // One round trip per batch (every key in the tenant's slot).
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.cmd("HMGET")
                    .arg(self.job_key(tenant, id))
                    .arg("state")
                    .arg("code")
                    .arg("attempts")
                    .arg("next_at")
                    .arg("model")
                    .arg("endpoint")
                    .arg("created");
            }
            let all: Vec<Listed> = self
                .redis_pipe(&pipe)
                .await
                .ok_or(ListRefusal::Unavailable)?;
            for (id, fields) in ids.into_iter().zip(all) {
                if page.jobs.len() == limit || scanned == LIST_SCAN {
                    page.has_more = true;
                    break 'scan;
                }
                scanned += 1;
                page.cursor = Some(id.clone());
                match listed_view(&id, fields) {
                    Some(view) if wanted(&view) => page.jobs.push(view),
                    Some(_) => {}
                    None => {
                        // Expired: its index entry goes too.
                        let _: Option<i64> =
                            self.redis(redis::cmd("ZREM").arg(&index).arg(&id)).await;
                    }
                }
            }
        }
        Ok(page)
    }

    /// Cancels the tenant's job `id`: a queued one at once, a running one
    /// by asking its instance to stop it (waiting a few seconds for that).
    /// The job as it then is; `None` when the tenant has no such job.
    pub async fn cancel_job(
        &self,
        tenant: usize,
        id: &str,
    ) -> Result<Option<JobView>, ParkRefusal> {
        let running = if let Some(r) = &self.inner.redis {
            let result = cancelled_result();
            let script = redis::Script::new(CANCEL);
            let mut invocation = script.key(self.job_key(tenant, id));
            invocation
                .key(self.key(tenant, "queue"))
                .key(self.key(tenant, "delayed"))
                .arg(Entry::Async { id: id.to_string() }.encode())
                .arg(serde_json::to_string(&result).unwrap_or_default())
                .arg(result.status)
                .arg(self.inner.jobs.result_ttl.as_secs());
            let mut conn = r.conn().ok_or(ParkRefusal::Unavailable)?;
            let answer: String =
                match tokio::time::timeout(r.timeout, invocation.invoke_async(&mut conn)).await {
                    Ok(Ok(answer)) => answer,
                    _ => {
                        metrics::REDIS_ERRORS.with_label_values(&["overflow"]).inc();
                        return Err(ParkRefusal::Unavailable);
                    }
                };
            match answer.as_str() {
                "" => return Ok(None),
                "cancelled" => {
                    self.count_job(tenant, "cancelled");
                    false
                }
                "running" => true,
                _ => false,
            }
        } else {
            let mut local = lock(&self.inner.local);
            let now = Instant::now();
            local.jobs.sweep(now);
            let tenant_id = &self.inner.tenant_ids[tenant];
            let Some(job) = local
                .jobs
                .get_mut(id)
                .filter(|j| &j.job.tenant == tenant_id)
            else {
                return Ok(None);
            };
            if job.running {
                job.cancel_requested = true;
                true
            } else {
                if job.pending() {
                    let entry = Entry::Async { id: id.to_string() };
                    local.jobs.cancel(id, now);
                    if let Some(queue) = local.queues.get_mut(&tenant) {
                        queue.retain(|e| e != &entry);
                    }
                    local.delayed.retain(|(_, _, e)| e != &entry);
                    self.count_job(tenant, "cancelled");
                }
                false
            }
        };
        if running {
            // Stops it at once when it runs here; another instance sees
            // the request within its next look.
            if let Some((_, stop)) = lock(&self.inner.running).get(id) {
                let _ = stop.send(true);
            }
            let until = Instant::now() + CANCEL_WAIT;
            loop {
                let view = self.job(tenant, id).await?;
                let still_running = matches!(&view, Some(v) if v.state == JobState::Running);
                if !still_running || Instant::now() >= until {
                    return Ok(view);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        self.job(tenant, id).await
    }

    /// Whether the tenant asked to cancel its running job `id` (with
    /// Redis: the job's `cancel` field, set on any instance).
    pub(super) async fn cancel_requested(&self, tenant: usize, id: &str) -> bool {
        if self.inner.redis.is_none() {
            return lock(&self.inner.local)
                .jobs
                .get(id)
                .is_some_and(|j| j.cancel_requested);
        }
        let set: Option<i64> = self
            .redis(
                redis::cmd("HEXISTS")
                    .arg(self.job_key(tenant, id))
                    .arg("cancel"),
            )
            .await;
        set == Some(1)
    }

    /// Starts an attempt at a claimed job (and, in process, takes it off
    /// the queue): its number, or `None` when it must not run (then its
    /// claim is acknowledged).
    pub(super) async fn start_attempt(&self, claim: &Claim, id: &str) -> Option<u32> {
        let tenant = claim.tenant;
        if self.inner.redis.is_none() {
            let mut local = lock(&self.inner.local);
            if let Some(queue) = local.queues.get_mut(&tenant) {
                queue.retain(|e| e != &claim.head);
            }
            return local.jobs.start_attempt(id);
        }
        let result = cancelled_result();
        let script = redis::Script::new(START);
        let mut invocation = script.key(self.job_key(tenant, id));
        invocation
            .arg(serde_json::to_string(&result).unwrap_or_default())
            .arg(result.status)
            .arg(self.inner.jobs.result_ttl.as_secs());
        let r = self.inner.redis.as_ref()?;
        let mut conn = r.conn()?;
        let number = match tokio::time::timeout(
            r.timeout,
            invocation.invoke_async::<i64>(&mut conn),
        )
        .await
        {
            Ok(Ok(number)) => number,
            _ => {
                metrics::REDIS_ERRORS.with_label_values(&["overflow"]).inc();
                // Not started: the claim goes back to the queue's head.
                self.requeue_claim(claim).await;
                return None;
            }
        };
        if number == -2 {
            self.count_job(tenant, "cancelled");
        }
        if number < 1 {
            self.acknowledge(claim).await;
            return None;
        }
        Some(number as u32)
    }

    /// Stores a job's final result (and, with Redis, acknowledges its
    /// claim).
    pub(super) async fn finish_job(&self, claim: &Claim, id: &str, result: &JobResult) {
        let tenant = claim.tenant;
        let outcome = if result.status < 400 {
            "completed"
        } else {
            "failed"
        };
        self.count(tenant, outcome);
        self.count_job(tenant, outcome);
        if self.inner.redis.is_none() {
            let mut local = lock(&self.inner.local);
            if let Some(queue) = local.queues.get_mut(&tenant) {
                queue.retain(|e| e != &claim.head);
            }
            local.jobs.finish(id, result, Instant::now());
            return;
        }
        self.end_job(claim, id, "done", result, 0).await;
    }

    /// Ends a running job cancelled by its tenant.
    pub(super) async fn finish_cancelled(&self, claim: &Claim, id: &str) {
        self.count_job(claim.tenant, "cancelled");
        if self.inner.redis.is_none() {
            lock(&self.inner.local).jobs.cancel(id, Instant::now());
            return;
        }
        self.end_job(claim, id, "cancelled", &cancelled_result(), 0)
            .await;
    }

    /// Puts a job back for another attempt at `next_attempt_ms` (unix ms),
    /// unless its tenant asked to cancel it meanwhile: then it ends
    /// cancelled.
    pub(super) async fn retry_job(&self, claim: &Claim, id: &str, next_attempt_ms: u64) {
        let tenant = claim.tenant;
        let cancelled = if self.inner.redis.is_none() {
            let mut local = lock(&self.inner.local);
            let now = Instant::now();
            if local.jobs.get(id).is_some_and(|j| j.cancel_requested) {
                local.jobs.cancel(id, now);
                true
            } else {
                local.jobs.retry_later(id, next_attempt_ms, now);
                local
                    .delayed
                    .push((next_attempt_ms, tenant, claim.head.clone()));
                false
            }
        } else {
            let written = self
                .end_job(claim, id, "queued", &JobResult::default(), next_attempt_ms)
                .await;
            written == "cancelled"
        };
        self.count_job(tenant, if cancelled { "cancelled" } else { "retried" });
    }

    /// Writes the end of an attempt and acknowledges its claim (the `END`
    /// script): the state written. A write Redis does not take is tried
    /// again until it does, the job holding its slot meanwhile (it is
    /// still this instance's, and shows `running`): dropping it would leave
    /// the job running for good, or, re-queued, run and billed again.
    async fn end_job(
        &self,
        claim: &Claim,
        id: &str,
        state: &str,
        result: &JobResult,
        next_attempt_ms: u64,
    ) -> String {
        let tenant = claim.tenant;
        let ttl = self.inner.jobs.result_ttl.as_secs();
        let cancelled = cancelled_result();
        let script = redis::Script::new(END);
        let mut invocation = script.key(self.job_key(tenant, id));
        invocation
            .key(&claim.processing)
            .key(self.key(tenant, "delayed"))
            .arg(state)
            .arg(next_attempt_ms)
            .arg(claim.head.encode())
            .arg(serde_json::to_string(result).unwrap_or_default())
            .arg(result.status)
            .arg(ttl * 7)
            .arg(serde_json::to_string(&cancelled).unwrap_or_default())
            .arg(cancelled.status)
            .arg(ttl);
        let mut wait = Duration::from_millis(250);
        for tries in 1u32.. {
            if let Some((r, mut conn)) =
                self.inner.redis.as_ref().and_then(|r| Some((r, r.conn()?)))
            {
                match tokio::time::timeout(
                    r.timeout * 4,
                    invocation.invoke_async::<String>(&mut conn),
                )
                .await
                {
                    Ok(Ok(written)) => return written,
                    Ok(Err(e)) => {
                        if tries == 1 {
                            warn!(job = %id, error = %e, "could not store the end of a job's attempt; trying again");
                        }
                    }
                    Err(_) if tries == 1 => {
                        warn!(job = %id, "could not store the end of a job's attempt in time; trying again");
                    }
                    Err(_) => {}
                }
                metrics::REDIS_ERRORS.with_label_values(&["overflow"]).inc();
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(5));
        }
        unreachable!("the loop above returns")
    }

    /// Moves the tenant's jobs whose backoff is over to the tail of its
    /// queue (they keep their place in the tenant's lane from then on).
    pub(super) async fn promote_due(&self, tenant: usize) {
        let now = unix_ms();
        if self.inner.redis.is_none() {
            let mut local = lock(&self.inner.local);
            let LocalState {
                queues, delayed, ..
            } = &mut *local;
            delayed.retain(|(at, t, entry)| {
                if *t != tenant || *at > now {
                    return true;
                }
                queues.entry(tenant).or_default().push_back(entry.clone());
                false
            });
            return;
        }
        let script = redis::Script::new(PROMOTE);
        let mut invocation = script.key(self.key(tenant, "delayed"));
        invocation.key(self.key(tenant, "queue")).arg(now);
        let Some(r) = &self.inner.redis else { return };
        let Some(mut conn) = r.conn() else { return };
        if let Ok(Ok(moved)) =
            tokio::time::timeout(r.timeout, invocation.invoke_async::<i64>(&mut conn)).await
        {
            if moved > 0 {
                self.inner.wake.notify_one();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_jobs_read_their_hash_fields() {
        let done = listed_view(
            "job_1",
            (
                Some("done".into()),
                Some(502),
                Some(3),
                None,
                Some("gpt-4o-mini".into()),
                Some("chat".into()),
                Some(1_700_000_000_000),
            ),
        )
        .unwrap();
        assert_eq!(done.status(), "failed");
        assert_eq!(done.attempts, 3);
        assert_eq!(done.to_json()["created_at"], 1_700_000_000);
        assert_eq!(done.to_json()["response_status"], 502);
        let waiting = listed_view(
            "job_2",
            (
                Some("queued".into()),
                None,
                Some(1),
                Some(1_700_000_000_500),
                None,
                None,
                None,
            ),
        )
        .unwrap();
        assert_eq!(waiting.status(), "queued");
        assert_eq!(waiting.to_json()["next_attempt_at"], 1_700_000_001);
        assert!(listed_view("gone", (None, None, None, None, None, None, None)).is_none());
    }
}
