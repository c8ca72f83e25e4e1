//! The in-process job store (no Redis): not durable, bounded and expiring.
//!
//! The store holds at most `jobs.in_process_max_jobs` jobs and
//! `jobs.in_process_max_bytes` bytes of requests and answers, and each
//! tenant at most its share of both (the bounds divided by the number of
//! tenants), so one tenant cannot fill it for the others. A submission past
//! a bound is refused; an answer that does not fit is replaced by a
//! `job_store_full` error (the job fails, the store stays bounded).
//! Finished jobs expire `result_ttl` after they finish, unfinished ones
//! seven times that after submission, as in Redis. A job's idempotency key
//! is kept for as long as the job, at most `idempotency_window`.

use super::jobs::{Job, JobResult, JobState, JobView, Submitted};
use crate::openai::ApiError;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How often expired jobs are dropped.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// The store's bounds.
#[derive(Debug, Clone, Copy)]
pub(super) struct Bounds {
    pub max_jobs: usize,
    pub max_bytes: usize,
    /// Each tenant's share.
    pub tenant_jobs: usize,
    pub tenant_bytes: usize,
    pub result_ttl: Duration,
    pub idempotency_window: Duration,
}

impl Bounds {
    /// The bounds for `tenants` tenants.
    pub(super) fn new(
        max_jobs: usize,
        max_bytes: usize,
        tenants: usize,
        result_ttl: Duration,
        idempotency_window: Duration,
    ) -> Self {
        let tenants = tenants.max(1);
        Bounds {
            max_jobs,
            max_bytes,
            tenant_jobs: (max_jobs / tenants).max(1),
            tenant_bytes: max_bytes / tenants,
            result_ttl,
            idempotency_window,
        }
    }
}

/// One job in the store.
#[derive(Debug)]
pub(super) struct LocalJob {
    pub job: Job,
    pub result: Option<JobResult>,
    pub running: bool,
    pub cancelled: bool,
    /// Its tenant asked to cancel it while it ran.
    pub cancel_requested: bool,
    /// Attempts started.
    pub attempts: u32,
    /// When its next attempt may start (unix ms), during a backoff.
    pub next_attempt_ms: Option<u64>,
    expires_at: Instant,
    /// Until when its idempotency key finds it.
    key_expires_at: Instant,
}

impl LocalJob {
    /// How the job looks from outside (`position` when queued).
    pub(super) fn view(&self, position: Option<usize>) -> JobView {
        let state = match (&self.result, self.cancelled, self.running) {
            (_, true, _) => JobState::Cancelled,
            (Some(result), false, _) => JobState::Done(result.clone()),
            (None, false, true) => JobState::Running,
            (None, false, false) => JobState::Queued(position),
        };
        JobView {
            id: self.job.id.clone(),
            state,
            model: self.job.model.clone(),
            endpoint: self.job.endpoint.clone(),
            created_ms: self.job.created_ms,
            attempts: self.attempts,
            next_attempt_ms: self.next_attempt_ms,
        }
    }

    /// Whether an attempt may still start.
    pub(super) fn pending(&self) -> bool {
        self.result.is_none() && !self.cancelled && !self.running
    }
}

impl LocalJob {
    fn size(&self) -> usize {
        self.job.size() + self.result.as_ref().map_or(0, |r| r.body.len())
    }
}

/// The jobs held in process.
#[derive(Debug)]
pub(super) struct LocalJobs {
    bounds: Bounds,
    jobs: HashMap<String, LocalJob>,
    bytes: usize,
    /// Jobs and bytes per tenant id.
    by_tenant: HashMap<String, (usize, usize)>,
    last_sweep: Instant,
}

impl LocalJobs {
    /// An empty store with these bounds.
    pub(super) fn new(bounds: Bounds) -> Self {
        LocalJobs {
            bounds,
            jobs: HashMap::new(),
            bytes: 0,
            by_tenant: HashMap::new(),
            last_sweep: Instant::now(),
        }
    }

    /// A job, by id.
    pub(super) fn get(&self, id: &str) -> Option<&LocalJob> {
        self.jobs.get(id)
    }

    /// A job, by id, to change.
    pub(super) fn get_mut(&mut self, id: &str) -> Option<&mut LocalJob> {
        self.jobs.get_mut(id)
    }

    /// The job the tenant's idempotency key (its digest) names, within
    /// the window: whether it was submitted with the same fingerprint.
    pub(super) fn by_key(&self, job: &Job, now: Instant) -> Option<Submitted> {
        let key = job.idempotency_key.as_deref()?;
        let found = self.jobs.values().find(|j| {
            j.job.tenant == job.tenant
                && j.job.idempotency_key.as_deref() == Some(key)
                && j.key_expires_at > now
        })?;
        Some(if found.job.fingerprint == job.fingerprint {
            Submitted::Existing(found.job.id.clone())
        } else {
            Submitted::KeyReused
        })
    }

    /// The tenant's jobs, newest first.
    pub(super) fn of_tenant(&self, tenant: &str) -> Vec<&LocalJob> {
        let mut jobs: Vec<&LocalJob> = self
            .jobs
            .values()
            .filter(|j| j.job.tenant == tenant)
            .collect();
        jobs.sort_by(|a, b| (b.job.created_ms, &b.job.id).cmp(&(a.job.created_ms, &a.job.id)));
        jobs
    }

    /// Adds a job, or says in how many ms room may free up.
    pub(super) fn insert(&mut self, job: Job, now: Instant) -> Result<(), u64> {
        self.sweep(now);
        let size = job.size();
        let (count, bytes) = self.by_tenant.get(&job.tenant).copied().unwrap_or_default();
        let b = &self.bounds;
        if self.jobs.len() >= b.max_jobs
            || self.bytes + size > b.max_bytes
            || count >= b.tenant_jobs
            || bytes + size > b.tenant_bytes
        {
            return Err(self.soonest_expiry_ms(now));
        }
        self.account(&job.tenant, 1, size as isize);
        let expires_at = now + self.bounds.result_ttl * 7;
        self.jobs.insert(
            job.id.clone(),
            LocalJob {
                job,
                result: None,
                running: false,
                cancelled: false,
                cancel_requested: false,
                attempts: 0,
                next_attempt_ms: None,
                expires_at,
                key_expires_at: now + self.bounds.idempotency_window,
            },
        );
        Ok(())
    }

    /// Takes a job out (its submission failed).
    pub(super) fn remove(&mut self, id: &str) {
        if let Some(gone) = self.jobs.remove(id) {
            self.account(&gone.job.tenant, -1, -(gone.size() as isize));
        }
    }

    /// Starts an attempt: its number, or `None` when the job may not run
    /// (finished, cancelled, gone).
    pub(super) fn start_attempt(&mut self, id: &str) -> Option<u32> {
        let job = self.jobs.get_mut(id).filter(|j| j.pending())?;
        job.running = true;
        job.next_attempt_ms = None;
        job.attempts += 1;
        Some(job.attempts)
    }

    /// An attempt failed and another follows at `next_attempt_ms`.
    pub(super) fn retry_later(&mut self, id: &str, next_attempt_ms: u64, now: Instant) {
        if let Some(job) = self.jobs.get_mut(id) {
            job.running = false;
            job.next_attempt_ms = Some(next_attempt_ms);
            job.expires_at = now + self.bounds.result_ttl * 7;
        }
    }

    /// Ends a job cancelled: kept `result_ttl` from now.
    pub(super) fn cancel(&mut self, id: &str, now: Instant) {
        if let Some(job) = self.jobs.get_mut(id) {
            job.running = false;
            job.cancelled = true;
            job.next_attempt_ms = None;
            job.expires_at = now + self.bounds.result_ttl;
        }
    }

    /// Stores a job's result, kept `result_ttl` from now. A result that
    /// would take the store or the tenant past its byte bound is replaced
    /// by a `job_store_full` error.
    pub(super) fn finish(&mut self, id: &str, result: &JobResult, now: Instant) {
        let Some(job) = self.jobs.get(id) else {
            return;
        };
        let tenant = job.job.tenant.clone();
        let (_, tenant_bytes) = self.by_tenant.get(&tenant).copied().unwrap_or_default();
        let fits = self.bytes + result.body.len() <= self.bounds.max_bytes
            && tenant_bytes + result.body.len() <= self.bounds.tenant_bytes;
        let result = if fits {
            result.clone()
        } else {
            JobResult::failed(&ApiError::job_store_full_for_answer(result.body.len()))
        };
        let grown = result.body.len();
        if let Some(job) = self.jobs.get_mut(id) {
            job.result = Some(result);
            job.running = false;
            job.next_attempt_ms = None;
            job.expires_at = now + self.bounds.result_ttl;
        }
        self.account(&tenant, 0, grown as isize);
    }

    /// Drops expired jobs (at most once per [`SWEEP_EVERY`]).
    pub(super) fn sweep(&mut self, now: Instant) {
        if now.duration_since(self.last_sweep) < SWEEP_EVERY {
            return;
        }
        self.last_sweep = now;
        let expired: Vec<String> = self
            .jobs
            .iter()
            .filter(|(_, job)| job.expires_at <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            self.remove(&id);
        }
    }

    /// Bytes held, for the whole store.
    #[cfg(test)]
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    fn account(&mut self, tenant: &str, jobs: isize, bytes: isize) {
        self.bytes = self.bytes.saturating_add_signed(bytes);
        let entry = self.by_tenant.entry(tenant.to_string()).or_default();
        entry.0 = entry.0.saturating_add_signed(jobs);
        entry.1 = entry.1.saturating_add_signed(bytes);
        if *entry == (0, 0) {
            self.by_tenant.remove(tenant);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str, tenant: &str, body: usize) -> Job {
        Job {
            id: id.into(),
            tenant: tenant.into(),
            model: "m".into(),
            endpoint: "chat".into(),
            body: "x".repeat(body),
            headers: Vec::new(),
            tokens: 1,
            created_ms: 0,
            callback: None,
            idempotency_key: None,
            fingerprint: String::new(),
        }
    }

    fn answer(len: usize) -> JobResult {
        JobResult {
            status: 200,
            body: "y".repeat(len),
        }
    }

    #[test]
    fn each_tenant_gets_its_share_and_no_more() {
        let now = Instant::now();
        let mut store = LocalJobs::new(Bounds::new(
            4,
            10_000,
            2,
            Duration::from_secs(60),
            Duration::from_secs(60),
        ));
        assert!(store.insert(job("a1", "a", 10), now).is_ok());
        assert!(store.insert(job("a2", "a", 10), now).is_ok());
        assert!(
            store.insert(job("a3", "a", 10), now).is_err(),
            "a's two jobs"
        );
        assert!(
            store.insert(job("b1", "b", 10), now).is_ok(),
            "b still has room"
        );
        assert!(
            store.insert(job("b2", "b", 6_000), now).is_err(),
            "b's 5,000 bytes"
        );
        store.remove("a1");
        assert!(store.insert(job("a3", "a", 10), now).is_ok());
    }

    #[test]
    fn answers_count_and_one_that_does_not_fit_fails_the_job() {
        let now = Instant::now();
        let mut store = LocalJobs::new(Bounds::new(
            10,
            3_000,
            1,
            Duration::from_secs(60),
            Duration::from_secs(60),
        ));
        store.insert(job("j1", "a", 100), now).unwrap();
        store.finish("j1", &answer(1_000), now);
        assert_eq!(
            store.get("j1").unwrap().result.as_ref().unwrap().status,
            200
        );
        store.insert(job("j2", "a", 100), now).unwrap();
        store.finish("j2", &answer(5_000), now);
        let kept = store.get("j2").unwrap().result.as_ref().unwrap();
        assert_eq!(kept.status, 503);
        assert!(kept.body.contains("job_store_full"));
        assert!(store.bytes() <= 3_000, "{}", store.bytes());
    }

    #[test]
    fn finished_jobs_expire_after_the_ttl() {
        let now = Instant::now();
        let mut store = LocalJobs::new(Bounds::new(
            10,
            10_000,
            1,
            Duration::from_secs(5),
            Duration::from_secs(5),
        ));
        store.insert(job("j1", "a", 10), now).unwrap();
        store.insert(job("j2", "a", 10), now).unwrap();
        store.finish("j1", &answer(10), now);
        store.sweep(now + Duration::from_secs(6));
        assert!(store.get("j1").is_none(), "finished, and past its TTL");
        assert!(store.get("j2").is_some(), "unfinished jobs live seven TTLs");
        store.sweep(now + Duration::from_secs(36));
        assert!(store.get("j2").is_none());
        assert_eq!(store.bytes(), 0);
    }
}
