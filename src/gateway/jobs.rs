//! Async jobs at the API: storing a request as a job (`Prefer:
//! respond-async`), answering `GET /v1/jobs/{id}`, and running a job the
//! drain admitted (the gateway is the overflow queue's [`JobRunner`]).

use super::client::{Collected, MAX_JOB_ANSWER_BYTES};
use super::forward::{Call, Exchange};
use super::{callback, respond, Gateway, RequestCtx};
use crate::cost;
use crate::limits::Grant;
use crate::openai::{rewrite_body, ApiError, Endpoint, RequestFields};
use crate::overflow::{Job, JobResult, JobRunner, JobState, ParkRefusal};
use async_trait::async_trait;
use bytes::Bytes;
use pingora::proxy::{ProxyHttp, Session};

impl Gateway {
    /// Stores the request as an async job: 202 with its `Location`.
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
        let job = Job {
            callback,
            id: crate::ids::random_id("job_"),
            tenant: self.config.tenants[tenant].id.clone(),
            model: self.config.models[route].name.clone(),
            endpoint: endpoint.name().to_string(),
            body: String::from_utf8_lossy(&crate::openai::without_streaming(body)).into_owned(),
            headers: ["accept", "user-agent", "openai-beta"]
                .iter()
                .filter_map(|name| {
                    Some((
                        name.to_string(),
                        headers.get(*name)?.to_str().ok()?.to_string(),
                    ))
                })
                .collect(),
            tokens,
            created_ms: crate::limits::now_ms() as u64,
        };
        let id = self.overflow.submit(tenant, job).await.map_err(|why| {
            let mut error = match why {
                ParkRefusal::Full => ApiError::rate_limit_exceeded("The overflow queue is full."),
                ParkRefusal::Unavailable => {
                    ApiError::rate_limit_exceeded("The job queue is unavailable.")
                }
                ParkRefusal::StoreFull(_) => ApiError::job_store_full(),
            };
            error.retry_after_ms = Some(match why {
                ParkRefusal::StoreFull(ms) => ms.clamp(1000, 60_000),
                _ => 1000,
            });
            error
        })?;
        let body = serde_json::json!({"id": id, "object": "runestone.job", "status": "queued"});
        let body = Bytes::from(body.to_string());
        let mut header = respond::response_header(202, ctx, body.len())
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let _ = header.insert_header("location", format!("/v1/jobs/{id}"));
        respond::write_complete(session, header, body).await;
        Ok(())
    }

    /// `GET /v1/jobs/{id}`: 202 while queued or running, the provider's
    /// answer (and status) when done; another tenant's job is a 404.
    pub(super) async fn job_status(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        tenant: usize,
        id: &str,
    ) -> Result<(), ApiError> {
        let state = self
            .overflow
            .job_state(tenant, id)
            .await
            .map_err(|_| ApiError::upstream_error("The job store is unavailable."))?
            .ok_or_else(|| ApiError::job_not_found(id))?;
        match state {
            JobState::Queued(position) => {
                let body = serde_json::json!({"id": id, "object": "runestone.job", "status": "queued", "position": position});
                respond::json(session, ctx, 202, body).await
            }
            JobState::Running => {
                let body =
                    serde_json::json!({"id": id, "object": "runestone.job", "status": "running"});
                respond::json(session, ctx, 202, body).await
            }
            JobState::Done(result) => {
                let body = Bytes::from(result.body);
                let header = respond::response_header(result.status, ctx, body.len())
                    .map_err(|e| ApiError::internal(e.to_string()))?;
                respond::write_complete(session, header, body).await;
                Ok(())
            }
        }
    }
}

#[async_trait]
impl JobRunner for Gateway {
    async fn post_callback(&self, url: &str, body: &[u8], signature: &str) -> bool {
        match callback::post(&self.forwarder.connector, url, body, signature).await {
            Ok(status) => (200..300).contains(&status),
            Err(e) => {
                tracing::warn!(error = %e, "callback could not be delivered");
                false
            }
        }
    }

    async fn run_job(&self, job: &Job, tenant: usize, route: usize, grant: Grant) -> JobResult {
        let mut ctx = self.new_ctx();
        ctx.request_id = job.id.clone();
        ctx.tenant = Some(tenant);
        ctx.exchange.route = Some(route);
        ctx.grant = Some(grant);
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
        let endpoint = Endpoint::from_name(&job.endpoint).unwrap_or(Endpoint::ChatCompletions);
        let parsed = RequestFields::parse(&body);
        let pin = match &parsed {
            Ok(fields) => self.follow_up_pin(tenant, route, endpoint, fields).await,
            Err(_) => Ok(None),
        };
        let outcome = match parsed.and_then(|fields| Ok((pin?, fields))) {
            Ok((pin, fields)) => {
                let estimate = cost::Estimate::new(body.clone(), fields.max_tokens);
                let RequestCtx {
                    request_id,
                    exchange: report,
                    grant,
                    cost_pusd,
                    started,
                    ..
                } = &mut ctx;
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
                    rate_limit_headers: &[],
                };
                let mut settler = super::accounting::Settler {
                    gateway: self,
                    tenant: Some(tenant),
                    grant,
                    cost_pusd,
                    started: *started,
                };
                self.forwarder
                    .forward(&mut client, &exchange, report, &mut settler)
                    .await
            }
            Err(error) => Err(error),
        };
        self.settle(&mut ctx).await;
        match outcome {
            Ok(()) if client.complete => JobResult {
                status: client.status.unwrap_or(200),
                body: String::from_utf8_lossy(&client.body).into_owned(),
            },
            Ok(()) if client.too_large => JobResult::failed(&ApiError::upstream_error(format!(
                "The provider's answer is larger than {MAX_JOB_ANSWER_BYTES} bytes, the most an async job keeps."
            ))),
            Ok(()) => JobResult::failed(&ApiError::upstream_error(
                "The provider broke off the response.",
            )),
            Err(error) => JobResult::failed(&error),
        }
    }
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
