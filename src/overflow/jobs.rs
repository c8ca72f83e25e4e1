//! Async jobs: what a job is, where it is stored (Redis, or a bounded
//! in-process store), its state for `GET /v1/jobs/{id}`, its result, and the
//! signed callback that delivers it.

use super::drain::Claim;
use super::local_jobs::LocalJobs;
use super::queue::Entry;
use super::{lock, unix_ms, Overflow, ParkRefusal};
use crate::limits::Grant;
use crate::openai::ApiError;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};
use tracing::warn;

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
    pub(super) fn size(&self) -> usize {
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

/// In-process queues and jobs (no Redis): not durable.
pub(super) struct LocalState {
    pub(super) queues: HashMap<usize, VecDeque<Entry>>,
    pub(super) jobs: LocalJobs,
}

impl Overflow {
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
                lock(&self.inner.local).jobs.remove(&id);
            }
            return Err(refusal);
        }
        self.inner.wake.notify_one();
        Ok(id)
    }

    /// Keeps a job in the in-process store, within its bounds.
    fn store_local(&self, job: Job) -> Result<(), ParkRefusal> {
        lock(&self.inner.local)
            .jobs
            .insert(job, Instant::now())
            .map_err(ParkRefusal::StoreFull)
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
            local.jobs.sweep(Instant::now());
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

    /// Marks a claimed job running (and, in process, takes it off the queue).
    pub(super) async fn mark_running(&self, tenant: usize, head: &Entry, id: &str) {
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
        local.jobs.mark_running(id);
        if let Some(queue) = local.queues.get_mut(&tenant) {
            queue.retain(|e| e != head);
        }
    }

    /// POSTs the result to the job's callback URL, retrying with backoff.
    /// The URL must still be on the tenant's allow-list.
    pub(super) async fn deliver_callback(
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
    pub(super) async fn finish_job(&self, claim: &Claim, id: &str, result: &JobResult) {
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
        local.jobs.finish(id, result, Instant::now());
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
