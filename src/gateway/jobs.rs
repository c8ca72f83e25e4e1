//! Async jobs at the API: storing a request as a job (`Prefer:
//! respond-async`, once per idempotency key), answering `GET /v1/jobs/{id}`,
//! `DELETE /v1/jobs/{id}` and `GET /v1/jobs`, and running one attempt at a
//! job the drain admitted (the gateway is the overflow queue's
//! [`JobRunner`]).

use super::client::{Collected, MAX_JOB_ANSWER_BYTES};
use super::forward::{Call, Exchange};
use super::{callback, respond, Gateway, RequestCtx};
use crate::cost;
use crate::limits::Grant;
use crate::openai::{rewrite_body, ApiError, Endpoint, RequestFields};
use crate::overflow::{
    Attempt, AttemptControl, Ended, Job, JobResult, JobRunner, JobState, JobView, ListRefusal,
    ParkRefusal, Submitted,
};
use async_trait::async_trait;
use bytes::Bytes;
use pingora::proxy::{ProxyHttp, Session};
use sha2::{Digest, Sha256};

/// Jobs a list page holds by default, and at most.
const LIST_DEFAULT: usize = 20;
const LIST_MAX: usize = 100;

impl Gateway {
    /// Stores the request as an async job: 202 with its `Location`; or,
    /// when its idempotency key names a job the tenant submitted with the
    /// same request, that job as `GET /v1/jobs/{id}` shows it.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn submit_job(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        tenant: usize,
        route: usize,
        endpoint: Endpoint,
        body: &Bytes,
        tokens: u64,
    ) -> Result<(), ApiError> {
        let headers = session.req_header().headers.clone();
        let mut callbacks = headers.get_all("x-runestone-callback").iter();
        let callback = match (callbacks.next(), callbacks.next()) {
            (None, _) => None,
            (Some(_), Some(_)) => return Err(ApiError::callback_not_allowed()),
            (Some(url), None) => {
                let url = url.to_str().unwrap_or_default();
                let allowed = self
                    .overflow
                    .settings(tenant)
                    .callbacks
                    .as_ref()
                    .and_then(|c| c.allowed(url))
                    .ok_or_else(ApiError::callback_not_allowed)?;
                Some(allowed.as_str().to_string())
            }
        };
        let model = self.config.models[route].name.clone();
        let body = String::from_utf8_lossy(&crate::openai::without_streaming(body)).into_owned();
        let fingerprint = fingerprint(endpoint, &model, callback.as_deref(), &body);
        let job = Job {
            idempotency_key: idempotency_key(&headers)?,
            fingerprint,
            callback,
            id: crate::ids::random_id("job_"),
            tenant: self.config.tenants[tenant].id.clone(),
            model,
            endpoint: endpoint.name().to_string(),
            body,
            headers: ["accept", "user-agent", "openai-beta"]
                .iter()
                .filter_map(|name| {
                    Some((
                        name.to_string(),
                        headers.get(*name)?.to_str().ok()?.to_string(),
                    ))
                })
                // The submission's span: each attempt's trace links to it.
                .chain(ctx.trace.as_ref().and_then(|trace| {
                    let traceparent = trace.traceparent().to_str().ok()?.to_string();
                    Some(("traceparent".to_string(), traceparent))
                }))
                .collect(),
            tokens,
            created_ms: crate::limits::now_ms() as u64,
        };
        let id = job.id.clone();
        let submitted = self.overflow.submit(tenant, job).await.map_err(|why| {
            let mut error = match why {
                ParkRefusal::Full => ApiError::rate_limit_exceeded("The overflow queue is full."),
                ParkRefusal::Unavailable => {
                    ApiError::rate_limit_exceeded("The job queue is unavailable.")
                }
                ParkRefusal::StoreFull(_) => ApiError::job_store_full(),
                // Redis may yet store and run it: say which job it would
                // be, so a retry with the same idempotency key finds it.
                ParkRefusal::Unconfirmed => {
                    let mut error = ApiError::rate_limit_exceeded(format!(
                        "The job queue did not confirm the job in time; it may still run as {id}. Retry with the same Idempotency-Key to get that job rather than a second one."
                    ));
                    if let Ok(location) = http::HeaderValue::try_from(format!("/v1/jobs/{id}")) {
                        error.headers.push((http::header::LOCATION, location));
                    }
                    error
                }
            };
            error.retry_after_ms = Some(match why {
                ParkRefusal::StoreFull(ms) => ms.clamp(1000, 60_000),
                _ => 1000,
            });
            error
        })?;
        let id = match submitted {
            Submitted::Created(id) => id,
            Submitted::KeyReused => return Err(ApiError::idempotency_key_reused()),
            Submitted::Existing(id) => {
                return match self.overflow.job(tenant, &id).await {
                    Ok(Some(view)) => self.answer_job(session, ctx, view, true).await,
                    // Its submission is still being stored: it is queued.
                    Ok(None) => self.answer_queued(session, ctx, &id, true).await,
                    Err(_) => Err(job_store_unavailable()),
                };
            }
        };
        self.answer_queued(session, ctx, &id, false).await
    }

    /// 202 for a job just queued, with its `Location`.
    async fn answer_queued(
        &self,
        session: &mut Session,
        ctx: &RequestCtx,
        id: &str,
        replayed: bool,
    ) -> Result<(), ApiError> {
        let body = serde_json::json!({"id": id, "object": "runestone.job", "status": "queued"});
        let body = Bytes::from(body.to_string());
        let mut header = respond::response_header(202, ctx, body.len())
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let _ = header.insert_header("location", format!("/v1/jobs/{id}"));
        if replayed {
            let _ = header.insert_header("idempotent-replayed", "true");
        }
        respond::write_complete(session, header, body).await;
        Ok(())
    }

    /// A job as `GET /v1/jobs/{id}` answers it: 202 and the job object
    /// while it waits or runs, its answer (with the answer's status) when
    /// done, a 409 `job_cancelled` when cancelled. `replayed`: the answer
    /// to a submission its idempotency key found (with `Location`).
    async fn answer_job(
        &self,
        session: &mut Session,
        ctx: &RequestCtx,
        view: JobView,
        replayed: bool,
    ) -> Result<(), ApiError> {
        let (status, body) = match &view.state {
            JobState::Queued(_) | JobState::Running => (202, view.to_json().to_string()),
            JobState::Done(result) => (result.status, result.body.clone()),
            JobState::Cancelled => (
                409,
                String::from_utf8_lossy(&ApiError::job_cancelled().body()).into_owned(),
            ),
        };
        let body = Bytes::from(body);
        let mut header = respond::response_header(status, ctx, body.len())
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let _ = header.insert_header("x-runestone-job-attempts", view.attempts.to_string());
        if replayed {
            let _ = header.insert_header("location", format!("/v1/jobs/{}", view.id));
            let _ = header.insert_header("idempotent-replayed", "true");
        }
        respond::write_complete(session, header, body).await;
        Ok(())
    }

    /// `GET /v1/jobs/{id}`; another tenant's job is a 404.
    pub(super) async fn job_status(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        tenant: usize,
        id: &str,
    ) -> Result<(), ApiError> {
        let view = self
            .overflow
            .job(tenant, id)
            .await
            .map_err(|_| job_store_unavailable())?
            .ok_or_else(|| ApiError::job_not_found(id))?;
        self.answer_job(session, ctx, view, false).await
    }

    /// `DELETE /v1/jobs/{id}`: cancels the job (a running one's provider
    /// call too) and answers the job object as it then is: `cancelled`,
    /// or its final state when it had already ended (202 `running` when
    /// its instance did not stop it within a few seconds).
    pub(super) async fn cancel_job(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        tenant: usize,
        id: &str,
    ) -> Result<(), ApiError> {
        let view = self
            .overflow
            .cancel_job(tenant, id)
            .await
            .map_err(|_| job_store_unavailable())?
            .ok_or_else(|| ApiError::job_not_found(id))?;
        let status = if view.state == JobState::Running {
            202
        } else {
            200
        };
        respond::json(session, ctx, status, view.to_json()).await
    }

    /// `GET /v1/jobs?status=&limit=&after=`: the tenant's jobs, newest
    /// first, a page at a time.
    pub(super) async fn list_jobs(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        tenant: usize,
    ) -> Result<(), ApiError> {
        let query = session
            .req_header()
            .uri
            .query()
            .unwrap_or_default()
            .to_owned();
        let (mut status, mut limit, mut after) = (None, LIST_DEFAULT, None);
        for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
            match name.as_ref() {
                "status" => {
                    let known = ["queued", "running", "completed", "failed", "cancelled"];
                    status = Some(known.into_iter().find(|s| *s == value).ok_or_else(|| {
                        ApiError::invalid_field(
                            "status",
                            "must be queued, running, completed, failed or cancelled",
                        )
                    })?);
                }
                "limit" => {
                    limit = value
                        .parse()
                        .ok()
                        .filter(|l| (1..=LIST_MAX).contains(l))
                        .ok_or_else(|| {
                            ApiError::invalid_field(
                                "limit",
                                format!("must be between 1 and {LIST_MAX}"),
                            )
                        })?;
                }
                "after" => after = Some(value.into_owned()),
                _ => {}
            }
        }
        let page = self
            .overflow
            .list_jobs(tenant, status, limit, after.as_deref())
            .await
            .map_err(|why| match why {
                ListRefusal::UnknownCursor => {
                    ApiError::invalid_field("after", "names no job of yours (it may have expired)")
                }
                ListRefusal::Unavailable => job_store_unavailable(),
            })?;
        let data: Vec<serde_json::Value> = page.jobs.iter().map(JobView::to_json).collect();
        let body = serde_json::json!({
            "object": "list",
            "data": data,
            "first_id": page.jobs.first().map(|j| j.id.as_str()),
            "last_id": page.cursor,
            "has_more": page.has_more,
        });
        respond::json(session, ctx, 200, body).await
    }
}

/// The answer when the job store (Redis) cannot be read.
fn job_store_unavailable() -> ApiError {
    ApiError::upstream_error("The job store is unavailable.")
}

/// The digest of a submission's idempotency key: the `Idempotency-Key`
/// header, else a client-supplied `x-request-id`. A key must be 1 to 255
/// visible ASCII characters, and given once.
fn idempotency_key(headers: &http::HeaderMap) -> Result<Option<String>, ApiError> {
    let (name, mut values) = match headers.get_all("idempotency-key").iter().next() {
        Some(_) => ("idempotency-key", headers.get_all("idempotency-key").iter()),
        None => ("x-request-id", headers.get_all("x-request-id").iter()),
    };
    let Some(key) = values.next() else {
        return Ok(None);
    };
    let bytes = key.as_bytes();
    if values.next().is_some() {
        return Err(ApiError::invalid_field(name, "given more than once"));
    }
    if bytes.is_empty() || bytes.len() > 255 || !bytes.iter().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::invalid_field(
            name,
            "must be 1 to 255 visible ASCII characters",
        ));
    }
    Ok(Some(hex::encode(Sha256::digest(bytes))))
}

/// The digest of what a job was submitted with: a key reused with any
/// other endpoint, model, callback or body is refused.
fn fingerprint(endpoint: Endpoint, model: &str, callback: Option<&str>, body: &str) -> String {
    let mut digest = Sha256::new();
    for part in [endpoint.name(), model, callback.unwrap_or(""), body] {
        digest.update((part.len() as u64).to_be_bytes());
        digest.update(part.as_bytes());
    }
    hex::encode(digest.finalize())
}

#[async_trait]
impl JobRunner for Gateway {
    async fn post_callback(&self, url: &str, body: &[u8], signature: &str) -> bool {
        match callback::post(&self.forwarder.connections, url, body, signature).await {
            Ok(status) => (200..300).contains(&status),
            Err(e) => {
                tracing::warn!(error = %e, "callback could not be delivered");
                false
            }
        }
    }

    async fn run_job(
        &self,
        job: &Job,
        tenant: usize,
        route: usize,
        grant: Grant,
        mut control: AttemptControl,
    ) -> Attempt {
        let endpoint = Endpoint::from_name(&job.endpoint).unwrap_or(Endpoint::ChatCompletions);
        let mut ctx = self.new_ctx();
        ctx.request_id = job.id.clone();
        ctx.endpoint = endpoint.name();
        ctx.job_attempt = Some(control.number);
        ctx.tenant = Some(tenant);
        ctx.exchange.route = Some(route);
        ctx.grant = Some(grant);
        let submitted_by = job.headers.iter().find(|(name, _)| name == "traceparent");
        ctx.trace = super::trace::RequestTrace::for_job(submitted_by.map(|(_, v)| v.as_str()));
        let body = Bytes::from(job.body.clone());
        let mut client = Collected::default();
        for (name, value) in &job.headers {
            if let (Ok(name), Ok(value)) = (
                http::HeaderName::try_from(name.as_str()),
                http::HeaderValue::try_from(value.as_str()),
            ) {
                client.request_headers.insert(name, value);
            }
        }
        let parsed = RequestFields::parse(&body);
        let pin = match &parsed {
            Ok(fields) => self.follow_up_pin(tenant, route, endpoint, fields).await,
            Err(_) => Ok(None),
        };
        let max_tokens = parsed.as_ref().ok().and_then(|f| f.max_tokens);
        if let Some(trace) = &mut ctx.trace {
            trace.note_request(&body, max_tokens);
        }
        let estimate = cost::Estimate::new(body.clone(), max_tokens);
        let mut stopped = None;
        // Its tier checked again: the config may have changed since it
        // was taken.
        let checked = parsed.and_then(|fields| {
            self.check_tier_priced(tenant, route, &fields)?;
            Ok((pin?, fields))
        });
        let outcome = match checked {
            Ok((pin, fields)) => {
                let RequestCtx {
                    request_id,
                    exchange: report,
                    grant,
                    cost_pusd,
                    started,
                    trace,
                    ..
                } = &mut *ctx;
                report.requested_tier = fields.requested_tier();
                let exchange = Exchange {
                    endpoint,
                    call: Call::post_json(),
                    pin,
                    bills: true,
                    routes: self.config.routes_for(tenant, route),
                    context_routes: self.config.context_routes_for(tenant, route),
                    stream: false,
                    resumable: false,
                    body_for: &|provider_model| rewrite_body(&body, &fields, provider_model, false),
                    request_id,
                    strip_usage: false,
                    estimate: &estimate,
                    rate_limits: Default::default(),
                    trace: trace.as_deref().map(|t| &t.context),
                };
                let mut settler = super::accounting::Settler {
                    gateway: self,
                    tenant: Some(tenant),
                    grant,
                    cost_pusd,
                    started: *started,
                };
                // Past its deadline, or cancelled, the attempt stops: the
                // provider call is dropped (its connection closed).
                // So does one the gateway ends as its grace period runs
                // out: the job is left for another attempt.
                tokio::select! {
                    outcome = self.forwarder.forward(&mut client, &exchange, report, &mut settler) => outcome,
                    ended = control.stopped() => {
                        stopped = Some(ended);
                        Ok(())
                    }
                    _ = crate::gateway::client::ending() => {
                        stopped = Some(Ended::Retryable);
                        Ok(())
                    }
                }
            }
            Err(error) => Err(error),
        };
        if stopped.is_some() && ctx.exchange.usage.is_none() && ctx.exchange.provider.is_some() {
            // Cut off before the provider's answer: the prompt it was sent
            // is billed, as the gateway counts it (nothing generated was
            // seen).
            ctx.exchange.usage = Some(estimate.prompt_sent(&job.model).await);
        }
        self.settle(&mut ctx).await;
        let (result, ended) = match (stopped, outcome) {
            (Some(Ended::Cancelled), _) => (
                JobResult::failed(&ApiError::job_cancelled()),
                Ended::Cancelled,
            ),
            (Some(Ended::Retryable), _) => {
                ctx.error_reason = Some(super::forward::GATEWAY_STOPPING);
                (
                    JobResult::failed(&ApiError::stopped_mid_answer()),
                    Ended::Retryable,
                )
            }
            (Some(_), _) => (
                JobResult::failed(&ApiError::job_timeout(self.config.jobs.timeout)),
                Ended::TimedOut,
            ),
            (None, Ok(())) if client.complete => {
                let status = client.status.unwrap_or(200);
                let ended = if status == 429 || status >= 500 {
                    Ended::Retryable
                } else {
                    Ended::Final
                };
                let body = String::from_utf8_lossy(&client.body).into_owned();
                (JobResult { status, body }, ended)
            }
            (None, Ok(())) => {
                // The collector refused the rest (too large), or the
                // provider broke off: its error, not a client's leaving
                // (a job has none).
                let (error, ended) = if client.too_large {
                    let message = format!(
                        "The provider's answer is larger than {MAX_JOB_ANSWER_BYTES} bytes, the most an async job keeps."
                    );
                    (ApiError::upstream_error(message), Ended::Final)
                } else {
                    (
                        ApiError::upstream_error("The provider broke off the response."),
                        Ended::Retryable,
                    )
                };
                ctx.error_reason = Some(error.reason());
                (JobResult::failed(&error), ended)
            }
            (None, Err(error)) => {
                ctx.error_reason = Some(error.reason());
                let ended = if retryable(&error) {
                    Ended::Retryable
                } else {
                    Ended::Final
                };
                (JobResult::failed(&error), ended)
            }
        };
        if let Ended::Cancelled | Ended::TimedOut = ended {
            ctx.error_reason = Some(if ended == Ended::Cancelled {
                "cancelled"
            } else {
                "provider_timeout"
            });
        }
        self.record(&ctx, result.status);
        Attempt { result, ended }
    }
}

/// Whether a gateway error ending an attempt is worth another: the
/// provider side failed (5xx, 429, timeout) or nothing could serve.
fn retryable(error: &ApiError) -> bool {
    matches!(
        error.reason(),
        "provider_5xx" | "provider_429" | "provider_timeout" | "no_healthy_upstream"
    )
}

/// Whether the client asked for an async answer (`Prefer: respond-async`).
pub(super) fn wants_async(session: &Session) -> bool {
    session
        .req_header()
        .headers
        .get_all("prefer")
        .iter()
        .any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split([',', ';'])
                    .any(|p| p.trim().eq_ignore_ascii_case("respond-async"))
            })
        })
}
