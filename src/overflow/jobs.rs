//! Async jobs: what a job is, what an attempt at it ends in, how a job
//! looks from outside (`GET /v1/jobs/{id}`, the list), and the signed
//! callback that delivers its result. Where jobs are kept is
//! `records.rs`.

use super::{unix_ms, Overflow};
use crate::limits::Grant;
use crate::openai::ApiError;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::time::Duration;
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
    /// The SHA-256 (hex) of the submission's idempotency key, if it had
    /// one (the key itself is never stored).
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// The SHA-256 (hex) of what was submitted (endpoint, model, callback,
    /// body): the same key with another submission is refused.
    #[serde(default)]
    pub fingerprint: String,
}

impl Job {
    /// Bytes the job holds in memory (the in-process store's bound).
    pub(super) fn size(&self) -> usize {
        self.body.len()
            + self.id.len()
            + self.callback.as_ref().map_or(0, String::len)
            + self.idempotency_key.as_ref().map_or(0, String::len)
            + self.fingerprint.len()
            + self
                .headers
                .iter()
                .map(|(n, v)| n.len() + v.len())
                .sum::<usize>()
    }
}

/// A finished job's answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
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

/// A job's state.
#[derive(Debug, Clone, PartialEq)]
pub enum JobState {
    /// Waiting for its first or next attempt; 1-based position in the
    /// tenant's queue when known (not while it waits out a backoff).
    Queued(Option<usize>),
    /// Claimed by an instance and running.
    Running,
    /// Finished: the answer of its last attempt.
    Done(JobResult),
    /// Cancelled by its tenant.
    Cancelled,
}

/// A job as `GET /v1/jobs/{id}`, the list and `DELETE` show it.
#[derive(Debug, Clone, PartialEq)]
pub struct JobView {
    /// `job_...`
    pub id: String,
    /// Where it is.
    pub state: JobState,
    /// The public model it asked for.
    pub model: String,
    /// Its endpoint's name (`chat`, ...).
    pub endpoint: String,
    /// Unix time of submission, ms.
    pub created_ms: u64,
    /// Attempts started so far.
    pub attempts: u32,
    /// When the next attempt may start (unix ms), while a failed attempt's
    /// backoff runs.
    pub next_attempt_ms: Option<u64>,
}

impl JobView {
    /// The job's status word: `queued`, `running`, `completed`, `failed`
    /// or `cancelled`.
    pub fn status(&self) -> &'static str {
        match &self.state {
            JobState::Queued(_) => "queued",
            JobState::Running => "running",
            JobState::Done(result) if result.status < 400 => "completed",
            JobState::Done(_) => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// The job object (without its answer).
    pub fn to_json(&self) -> serde_json::Value {
        let mut job = serde_json::json!({
            "id": self.id,
            "object": "runestone.job",
            "status": self.status(),
            "model": self.model,
            "endpoint": self.endpoint,
            "created_at": self.created_ms / 1000,
            "attempts": self.attempts,
        });
        match &self.state {
            JobState::Queued(position) => {
                job["position"] = serde_json::json!(position);
                if let Some(at) = self.next_attempt_ms {
                    job["next_attempt_at"] = serde_json::json!(at.div_ceil(1000));
                }
            }
            JobState::Done(result) => job["response_status"] = serde_json::json!(result.status),
            JobState::Running | JobState::Cancelled => {}
        }
        job
    }
}

/// What submitting a job came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Submitted {
    /// A new job, queued.
    Created(String),
    /// The tenant's idempotency key names this job, submitted with the
    /// same request: nothing new was queued.
    Existing(String),
    /// The key names a job submitted with another request.
    KeyReused,
}

/// How one attempt at a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// With an answer to keep: the job is done (completed, or failed for
    /// good, as with a 4xx).
    Final,
    /// With a failure worth another attempt: a 5xx after failover, no
    /// healthy upstream, a provider 429, an answer broken off.
    Retryable,
    /// Past `jobs.timeout_seconds`: cut off upstream, worth another attempt.
    TimedOut,
    /// Its tenant cancelled the job while it ran.
    Cancelled,
}

/// One attempt's result.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    /// The answer (or the error) it ended with.
    pub result: JobResult,
    /// How it ended.
    pub ended: Ended,
}

/// What an attempt runs under: its number, its deadline and its
/// cancellation.
pub struct AttemptControl {
    /// 1 for the first attempt.
    pub number: u32,
    /// When the attempt is cut off (`jobs.timeout_seconds` after it starts).
    pub deadline: tokio::time::Instant,
    /// Turns true when the job is cancelled.
    pub cancel: tokio::sync::watch::Receiver<bool>,
}

impl AttemptControl {
    /// Resolves when the attempt must stop, and why.
    pub async fn stopped(&mut self) -> Ended {
        let deadline = self.deadline;
        let cancel = &mut self.cancel;
        let cancelled = async move { cancel.wait_for(|c| *c).await.is_ok() };
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => Ended::TimedOut,
            cancelled = cancelled => {
                if !cancelled {
                    // Nobody can cancel any more: only the deadline is left.
                    tokio::time::sleep_until(deadline).await;
                    return Ended::TimedOut;
                }
                Ended::Cancelled
            }
        }
    }
}

/// Runs an admitted job; the gateway implements it.
#[async_trait]
pub trait JobRunner: Send + Sync {
    /// Forwards the job's request as `tenant`'s request for `route` (both
    /// indices in the running config, resolved from the job's names),
    /// stopping when `control` says so; settles `grant` with what the
    /// attempt used.
    async fn run_job(
        &self,
        job: &Job,
        tenant: usize,
        route: usize,
        grant: Grant,
        control: AttemptControl,
    ) -> Attempt;
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

impl Overflow {
    /// Delivers a job's result to its callback URL on a task of its own:
    /// a slow or dead receiver holds no job slot and never the drain.
    pub(super) fn send_callback(
        &self,
        runner: std::sync::Arc<dyn JobRunner>,
        tenant: usize,
        job: Job,
        result: JobResult,
    ) {
        if job.callback.is_none() {
            return;
        }
        let overflow = self.clone();
        let mut sending = super::lock(&self.inner.callbacks);
        while sending.try_join_next().is_some() {}
        sending.spawn(async move {
            overflow
                .deliver_callback(runner.as_ref(), tenant, &job, &result)
                .await;
        });
    }

    /// Waits for the callbacks still being delivered (at shutdown; the
    /// grace period bounds it).
    pub(super) async fn callbacks_sent(&self) {
        let mut sending = std::mem::take(&mut *super::lock(&self.inner.callbacks));
        while sending.join_next().await.is_some() {}
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
