//! The Pingora glue: Runestone's `ProxyHttp` implementation.
//!
//! Pingora's own proxy phases replay a pre-read request body only through a
//! 64 KiB retry buffer, and routing needs the whole body (the OpenAI SDKs
//! put `model` after `messages`). So the gateway reads the body once in
//! `request_filter`, decides everything there, and forwards the exchange
//! itself through Pingora's connector ([`forward`]): one code path for every
//! body size, with the body kept in hand for a retry on another backend.
//! `request_filter` therefore always answers the request and returns
//! `Ok(true)`; `logging` then records metrics. `upstream_peer` is never
//! reached.

mod access_log;
mod callback;
mod client;
mod forward;

use crate::admin;
use crate::auth;
use crate::config::Config;
use crate::config::ModelRoute;
use crate::cost::{self, Usage};
use crate::limits::{Grant, LimitKind, Limiter, RateLimitState, Refusal, Settlement};
use crate::metrics;
use crate::openai::{rewrite_body, ApiError, Endpoint, RequestFields};
use crate::overflow::{Job, JobResult, JobRunner, JobState, Overflow, ParkRefusal, Waited};
use crate::upstream::Upstreams;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use client::Collected;
use futures_util::FutureExt;
use http::{HeaderName, HeaderValue};
use pingora::connectors::http::v1::Connector;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;
use tracing::debug;

/// Per-request state, carried from `request_filter` to `logging`.
pub struct RequestCtx {
    started: Instant,
    request_id: String,
    tenant: Option<usize>,
    route: Option<usize>,
    provider: Option<usize>,
    error_reason: Option<&'static str>,
    /// The admission to settle in `logging`.
    grant: Option<Grant>,
    /// `x-ratelimit-*` headers for the tenant's own limits.
    rate_limit_headers: Vec<(HeaderName, HeaderValue)>,
    /// Prompt tokens estimated from the request body.
    prompt_estimate: u64,
    /// The gateway asked for `include_usage` on the client's behalf.
    strip_usage: bool,
    /// Usage read from (or estimated for) the response.
    usage: Option<Usage>,
    /// Attempts made against backends.
    attempts: u32,
    /// The endpoint, for the access log (`chat`, `models`, ...).
    endpoint: &'static str,
    /// The backend that served (or last failed).
    backend: Option<std::net::SocketAddr>,
    /// The index of that backend's target within the route.
    target: Option<usize>,
    /// When the first body byte went to the client.
    first_byte_at: Option<Instant>,
    /// Time spent waiting on providers, over all attempts.
    upstream_time: std::time::Duration,
    /// Time spent parked in the overflow queue.
    parked: std::time::Duration,
    /// The request's cost, once settled.
    cost_pusd: i64,
}

/// The gateway: config, upstreams, limits and the connection pool to providers.
#[derive(Clone)]
pub struct Gateway {
    config: Arc<Config>,
    upstreams: Arc<Upstreams>,
    limiter: Limiter,
    overflow: Overflow,
    connector: Arc<Connector>,
    auth_failures: Arc<auth::FailureThrottle>,
    /// Tenant key digests -> tenant.
    keys: Arc<auth::KeyIndex>,
}

impl Gateway {
    /// A gateway serving `config` through `upstreams`, admitting with `limiter`.
    pub fn new(
        config: Arc<Config>,
        upstreams: Arc<Upstreams>,
        limiter: Limiter,
        overflow: Overflow,
        connector: Connector,
    ) -> Self {
        Gateway {
            keys: Arc::new(auth::KeyIndex::new(&config.tenants)),
            auth_failures: Arc::new(auth::FailureThrottle::new(
                config.server.auth_failures_per_minute,
            )),
            config,
            upstreams,
            limiter,
            overflow,
            connector: Arc::new(connector),
        }
    }

    /// Answers one request: locally, by forwarding it, or with an error.
    async fn serve(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<(), ApiError> {
        let limit = self.config.server.max_request_header_bytes;
        if head_size(session.req_header()) > limit {
            return Err(ApiError::headers_too_large(limit));
        }
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        match (method.as_str(), path.as_str()) {
            ("GET" | "HEAD", "/health") => {
                ctx.endpoint = "health";
                let (status, body) = admin::health();
                respond_json(session, ctx, status, body).await
            }
            ("GET" | "HEAD", "/ready") => {
                ctx.endpoint = "ready";
                let redis_up = self.limiter.redis().map(|r| r.is_up());
                let (status, body) = admin::ready(&self.config, &self.upstreams, redis_up);
                respond_json(session, ctx, status, body).await
            }
            ("GET", "/v1/models") => {
                ctx.endpoint = "models";
                let tenant = self.authenticate(session, ctx)?;
                let (status, body) = admin::models(&self.config, &self.config.tenants[tenant]);
                respond_json(session, ctx, status, body).await
            }
            ("GET", "/v1/usage") => {
                ctx.endpoint = "usage";
                let tenant = self.authenticate(session, ctx)?;
                let report = self.limiter.usage(tenant).await;
                let (status, body) = admin::usage(&self.config.tenants[tenant], &report);
                respond_json(session, ctx, status, body).await
            }
            ("GET", _) if path.starts_with("/v1/jobs/") => {
                ctx.endpoint = "jobs";
                let tenant = self.authenticate(session, ctx)?;
                let id = &path["/v1/jobs/".len()..];
                self.job_status(session, ctx, tenant, id).await
            }
            ("POST", _) if Endpoint::from_path(&path).is_some() => {
                let endpoint = Endpoint::from_path(&path).expect("checked by the guard");
                ctx.endpoint = endpoint.name();
                self.proxy(session, ctx, endpoint).await
            }
            (_, "/health" | "/ready" | "/v1/models" | "/v1/usage") => {
                Err(ApiError::method_not_allowed(method.as_str(), &path))
            }
            (_, _) if Endpoint::from_path(&path).is_some() => {
                Err(ApiError::method_not_allowed(method.as_str(), &path))
            }
            _ => Err(ApiError::unknown_url(method.as_str(), &path)),
        }
    }

    /// Authenticates the request; the tenant's index in the config. A valid
    /// key always passes; failures are counted per client address, and an
    /// address past `auth_failures_per_minute` is answered 429 instead of
    /// 401.
    fn authenticate(&self, session: &Session, ctx: &mut RequestCtx) -> Result<usize, ApiError> {
        let headers = &session.req_header().headers;
        let presented = auth::presented_key(
            headers
                .get_all("authorization")
                .iter()
                .map(|v| v.as_bytes()),
            headers.get_all("x-api-key").iter().map(|v| v.as_bytes()),
        );
        let error = match presented {
            auth::Presented::Key(key) => match self.keys.authenticate(key) {
                Some(tenant) => {
                    ctx.tenant = Some(tenant);
                    return Ok(tenant);
                }
                None => ApiError::invalid_api_key("Incorrect API key provided."),
            },
            auth::Presented::Missing => ApiError::invalid_api_key("You didn't provide an API key."),
            auth::Presented::Conflicting => ApiError::invalid_api_key(
                "The request carries two different API keys (Authorization and x-api-key, or two of one).",
            ),
        };
        let Some(peer) = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip())
        else {
            return Err(error);
        };
        let client = auth::client_address(
            peer,
            &self.config.server.trusted_proxies,
            headers.get_all("forwarded").iter().map(|v| v.as_bytes()),
            headers
                .get_all("x-forwarded-for")
                .iter()
                .map(|v| v.as_bytes()),
        );
        match self
            .auth_failures
            .record_failure(client, crate::limits::now_ms())
        {
            Ok(()) => Err(error),
            Err(retry_after_ms) => {
                let mut error = ApiError::rate_limit_exceeded(
                    "Too many failed authentications from your address.",
                );
                error.retry_after_ms = Some(retry_after_ms.max(1));
                error.reason = Some(crate::openai::Reason::Auth);
                Err(error)
            }
        }
    }

    /// The proxied endpoints: authenticate, read the body, route, forward.
    async fn proxy(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        endpoint: Endpoint,
    ) -> Result<(), ApiError> {
        check_framing(session)?;
        let tenant = self.authenticate(session, ctx)?;
        let body = read_body(session, self.config.server.max_request_body_bytes).await?;
        let fields = RequestFields::parse(&body)?;
        let (route_index, route) = self
            .config
            .route(&fields.model)
            .ok_or_else(|| ApiError::model_not_found(&fields.model))?;
        ctx.route = Some(route_index);
        if !self.config.tenants[tenant].may_use(&route.name) {
            return Err(ApiError::model_not_allowed(&route.name));
        }
        if endpoint == Endpoint::ChatCompletions && fields.messages_is_array != Some(true) {
            // Refused here rather than spending an admission and a provider
            // call on it.
            return Err(ApiError::invalid_field(
                "messages",
                "expected an array of messages",
            ));
        }
        let generates = endpoint != Endpoint::Embeddings;
        let tokens = cost::estimate_request_tokens(body.len(), fields.max_tokens, generates);
        ctx.prompt_estimate = cost::estimate_prompt_tokens(body.len());
        if wants_async(session) {
            return self
                .submit_job(session, ctx, tenant, route_index, endpoint, &body, tokens)
                .await;
        }
        let overflow = self.overflow.settings(tenant);
        let can_serve = self.upstreams.can_serve(route);
        let grant = match self.limiter.admit(tenant, tokens).await {
            Ok(grant) if can_serve || !overflow.enabled => grant,
            Ok(grant) => {
                // Nothing can serve the model right now: wait for it.
                self.limiter.release(grant).await;
                match self
                    .wait_in_queue(session, ctx, tenant, route_index, tokens, None)
                    .await?
                {
                    Some(grant) => grant,
                    None => return Ok(()),
                }
            }
            Err(refusal) if overflow.enabled && refusal.limit != LimitKind::Budget => {
                self.limiter.count_refusal(tenant, &refusal);
                match self
                    .wait_in_queue(session, ctx, tenant, route_index, tokens, Some(refusal))
                    .await?
                {
                    Some(grant) => grant,
                    None => return Ok(()),
                }
            }
            Err(refusal) => {
                self.limiter.count_refusal(tenant, &refusal);
                return Err(refusal_error(refusal));
            }
        };
        ctx.rate_limit_headers = rate_limit_headers(&grant.state);
        ctx.grant = Some(grant);
        // Usage is read from streams too: ask for it, and take it out again
        // when the client did not ask.
        let ask_usage = fields.stream && generates && !fields.client_wants_usage();
        ctx.strip_usage = ask_usage;
        debug!(request_id = %ctx.request_id, tenant = %self.config.tenants[tenant].id, model = %route.name, endpoint = endpoint.name(), "routing");
        let request = forward::Request {
            endpoint,
            routes: self.routes_for(tenant, route_index),
            stream: fields.stream,
            body_for: &|provider_model| rewrite_body(&body, &fields, provider_model, ask_usage),
        };
        forward::forward(self, session, ctx, request).await
    }
}

impl Gateway {
    /// The route and then its fallbacks the tenant may use, in order.
    fn routes_for(&self, tenant: usize, route_index: usize) -> Vec<(usize, &ModelRoute)> {
        let route = &self.config.models[route_index];
        std::iter::once(route_index)
            .chain(route.fallbacks.iter().copied())
            .filter(|&r| {
                r == route_index || self.config.tenants[tenant].may_use(&self.config.models[r].name)
            })
            .map(|r| (r, &self.config.models[r]))
            .collect()
    }

    /// Parks the request until the limiter admits it (and its model can be
    /// served), the tenant's `max_wait` passes, or the client leaves
    /// (`Ok(None)`: nothing more to send).
    async fn wait_in_queue(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        tenant: usize,
        route: usize,
        tokens: u64,
        refusal: Option<Refusal>,
    ) -> Result<Option<Grant>, ApiError> {
        let retry_after_ms = refusal
            .as_ref()
            .and_then(|r| r.retry_after_ms)
            .unwrap_or(1000)
            .max(1);
        let mut parked = match self.overflow.park(tenant, route, tokens).await {
            Ok(parked) => parked,
            Err(why) => {
                let mut error = ApiError::rate_limit_exceeded(match why {
                    ParkRefusal::Full | ParkRefusal::StoreFull(_) => {
                        "Rate limit reached and the overflow queue is full."
                    }
                    ParkRefusal::Unavailable => {
                        "Rate limit reached and the overflow queue is unavailable."
                    }
                });
                error.retry_after_ms = Some(retry_after_ms);
                if let Some(refusal) = &refusal {
                    error.headers = rate_limit_headers(&refusal.state);
                }
                return Err(error);
            }
        };
        let parked_at = Instant::now();
        let waited = tokio::select! {
            waited = self.overflow.wait(&mut parked) => Some(waited),
            _ = session.downstream_session.read_body_or_idle(true) => None,
        };
        ctx.parked = parked_at.elapsed();
        match waited {
            Some(Waited::Admitted(grant)) => Ok(Some(grant)),
            Some(Waited::TimedOut) => {
                let mut error = ApiError::rate_limit_exceeded(
                    "Rate limit reached; the request waited in the overflow queue for as long as allowed.",
                );
                error.retry_after_ms = Some(retry_after_ms);
                error.reason = Some(crate::openai::Reason::OverflowTimeout);
                Err(error)
            }
            None => {
                self.overflow.abandon(&mut parked, &self.limiter).await;
                Ok(None)
            }
        }
    }

    /// Stores the request as an async job: 202 with its `Location`.
    #[allow(clippy::too_many_arguments)]
    async fn submit_job(
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
        let mut header =
            response_header(202, ctx, body.len()).map_err(|e| ApiError::internal(e.to_string()))?;
        let _ = header.insert_header("location", format!("/v1/jobs/{id}"));
        write_complete(session, header, body).await;
        Ok(())
    }

    /// `GET /v1/jobs/{id}`: 202 while queued or running, the provider's
    /// answer (and status) when done; another tenant's job is a 404.
    async fn job_status(
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
                respond_json(session, ctx, 202, body).await
            }
            JobState::Running => {
                let body =
                    serde_json::json!({"id": id, "object": "runestone.job", "status": "running"});
                respond_json(session, ctx, 202, body).await
            }
            JobState::Done(result) => {
                let body = Bytes::from(result.body);
                let header = response_header(result.status, ctx, body.len())
                    .map_err(|e| ApiError::internal(e.to_string()))?;
                write_complete(session, header, body).await;
                Ok(())
            }
        }
    }
}

#[async_trait]
impl JobRunner for Gateway {
    async fn post_callback(&self, url: &str, body: &[u8], signature: &str) -> bool {
        match callback::post(&self.connector, url, body, signature).await {
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
        ctx.route = Some(route);
        ctx.grant = Some(grant);
        let body = Bytes::from(job.body.clone());
        ctx.prompt_estimate = cost::estimate_prompt_tokens(body.len());
        let mut client = Collected::default();
        for (name, value) in &job.headers {
            if let (Ok(name), Ok(value)) = (
                http::HeaderName::try_from(name.as_str()),
                http::HeaderValue::try_from(value.as_str()),
            ) {
                client.request_headers.insert(name, value);
            }
        }
        let endpoint = match job.endpoint.as_str() {
            "completions" => Endpoint::Completions,
            "embeddings" => Endpoint::Embeddings,
            _ => Endpoint::ChatCompletions,
        };
        let outcome = match RequestFields::parse(&body) {
            Ok(fields) => {
                let request = forward::Request {
                    endpoint,
                    routes: self.routes_for(tenant, route),
                    stream: false,
                    body_for: &|provider_model| rewrite_body(&body, &fields, provider_model, false),
                };
                forward::forward(self, &mut client, &mut ctx, request).await
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
                "The provider's answer is larger than {} bytes, the most an async job keeps.",
                client::MAX_JOB_ANSWER_BYTES
            ))),
            Ok(()) => JobResult::failed(&ApiError::upstream_error(
                "The provider broke off the response.",
            )),
            Err(error) => JobResult::failed(&error),
        }
    }
}

/// Whether the client asked for an async answer (`Prefer: respond-async`).
fn wants_async(session: &Session) -> bool {
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

impl Gateway {
    /// The tenant id and public model name of a request, for labels and logs
    /// (empty when not known yet).
    fn labels(&self, ctx: &RequestCtx) -> (&str, &str) {
        let tenant = ctx
            .tenant
            .map_or("", |t| self.config.tenants[t].id.as_str());
        let model = ctx
            .route
            .map_or("", |r| self.config.models[r].name.as_str());
        (tenant, model)
    }

    /// The price of the target that served the request: its own
    /// `provider/model` entry, else its public model's.
    fn price(&self, ctx: &RequestCtx) -> Option<&crate::config::Price> {
        let route = &self.config.models[ctx.route?];
        match ctx.target {
            Some(target) => route.targets[target].price.as_ref(),
            None => self.config.pricing.get(&route.name),
        }
    }

    /// Settles the request's admission with its usage (none when no provider
    /// answered): frees its slot, corrects its tokens, adds its spend, and
    /// counts tokens and cost. Runs once; later calls do nothing.
    pub(crate) async fn settle(&self, ctx: &mut RequestCtx) {
        let Some(grant) = ctx.grant.take() else {
            return;
        };
        let (tenant, model) = self.labels(ctx);
        let usage = ctx.usage.unwrap_or_default();
        let cost_pusd = usage.cost_pusd(self.price(ctx));
        if usage.total() > 0 {
            let [t, m, _] = label_key(ctx);
            metrics::child(&metrics::TOKENS, [t, m, 0, 0], |v| {
                v.with_label_values(&[tenant, model, "prompt"])
            })
            .inc_by(usage.prompt_tokens);
            metrics::child(&metrics::TOKENS, [t, m, 1, 0], |v| {
                v.with_label_values(&[tenant, model, "completion"])
            })
            .inc_by(usage.completion_tokens);
            metrics::child(&metrics::COST_USD, [t, m, 0, 0], |v| {
                v.with_label_values(&[tenant, model])
            })
            .inc_by(cost_pusd as f64 / crate::config::PICO_PER_USD);
        }
        ctx.cost_pusd = cost_pusd;
        let settlement = Settlement {
            usage,
            cost_pusd,
            duration: ctx.started.elapsed(),
        };
        self.limiter.settle(grant, settlement).await;
    }
}

/// The tenant, route and provider indices behind [`Gateway::labels`] and the
/// provider label, as a key for [`metrics::child`] (`u32::MAX` when unknown).
fn label_key(ctx: &RequestCtx) -> [u32; 3] {
    let index = |i: Option<usize>| i.map_or(u32::MAX, |i| i as u32);
    [index(ctx.tenant), index(ctx.route), index(ctx.provider)]
}

/// The 429 for a refused admission, with the limiter's own retry time.
fn refusal_error(refusal: Refusal) -> ApiError {
    let mut error = match refusal.limit {
        LimitKind::Budget => ApiError::insufficient_quota(
            "You exceeded your budget for the current period; it is restored when the period ends.",
        ),
        LimitKind::Requests => {
            ApiError::rate_limit_exceeded("Rate limit reached for requests per minute.")
        }
        LimitKind::Tokens => {
            ApiError::rate_limit_exceeded("Rate limit reached for tokens per minute.")
        }
        LimitKind::Concurrency => {
            ApiError::rate_limit_exceeded("Too many concurrent requests; wait for one to finish.")
        }
    };
    error.retry_after_ms = refusal.retry_after_ms;
    error.headers = rate_limit_headers(&refusal.state);
    if refusal.retry_after_ms.is_none() {
        // Waiting will not help (a spent `total` budget): tell the SDKs not
        // to retry.
        error.headers.push((
            HeaderName::from_static("x-should-retry"),
            HeaderValue::from_static("false"),
        ));
    }
    error
}

/// OpenAI's `x-ratelimit-*` header names: limit, remaining, reset, for
/// requests and for tokens.
const RATE_LIMIT_NAMES: [[HeaderName; 3]; 2] = [
    [
        HeaderName::from_static("x-ratelimit-limit-requests"),
        HeaderName::from_static("x-ratelimit-remaining-requests"),
        HeaderName::from_static("x-ratelimit-reset-requests"),
    ],
    [
        HeaderName::from_static("x-ratelimit-limit-tokens"),
        HeaderName::from_static("x-ratelimit-remaining-tokens"),
        HeaderName::from_static("x-ratelimit-reset-tokens"),
    ],
];

/// OpenAI's `x-ratelimit-*` headers for the tenant's own limits.
fn rate_limit_headers(state: &RateLimitState) -> Vec<(HeaderName, HeaderValue)> {
    let mut headers = Vec::new();
    for (window, [limit, remaining, reset]) in [state.requests, state.tokens]
        .into_iter()
        .zip(RATE_LIMIT_NAMES)
    {
        if let Some(w) = window {
            headers.push((limit, HeaderValue::from(w.limit)));
            headers.push((remaining, HeaderValue::from(w.remaining)));
            // Digits, `.`, `m` and `s` only: always a valid value.
            if let Ok(value) = HeaderValue::try_from(format_reset(w.reset_ms)) {
                headers.push((reset, value));
            }
        }
    }
    headers
}

/// A duration as OpenAI writes resets: `20ms`, `8.64s`, `6m0s`.
fn format_reset(ms: u64) -> String {
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let minutes = ms / 60_000;
    let secs = (ms % 60_000) as f64 / 1000.0;
    let secs = format!("{secs:.3}");
    let secs = secs.trim_end_matches('0').trim_end_matches('.');
    if minutes > 0 {
        format!("{minutes}m{secs}s")
    } else {
        format!("{secs}s")
    }
}

/// Rejects bodies whose framing is ambiguous (request smuggling): both
/// `Transfer-Encoding` and `Content-Length`.
///
/// Pingora drops `Content-Length` from the parsed header when
/// `Transfer-Encoding` is also present (RFC 9112 6.3), so the request head
/// as it came off the wire is what is checked.
fn check_framing(session: &Session) -> Result<(), ApiError> {
    let headers = &session.req_header().headers;
    if !headers.contains_key("transfer-encoding") {
        return Ok(());
    }
    let raw_has_length = session
        .as_downstream()
        .as_http1()
        .is_some_and(|h1| has_content_length_line(&h1.get_headers_raw_bytes()));
    if headers.contains_key("content-length") || raw_has_length {
        return Err(ApiError::bad_request(
            "A request must not carry both Content-Length and Transfer-Encoding.",
        ));
    }
    Ok(())
}

/// Whether a raw HTTP/1 request head has a `Content-Length` header line.
fn has_content_length_line(head: &[u8]) -> bool {
    const NAME: &[u8] = b"content-length";
    head.split(|&b| b == b'\n').skip(1).any(|line| {
        line.len() > NAME.len()
            && line[..NAME.len()].eq_ignore_ascii_case(NAME)
            && line[NAME.len()..]
                .iter()
                .find(|b| !matches!(b, b' ' | b'\t'))
                == Some(&b':')
    })
}

/// The size of a request head as sent: request line and header lines.
fn head_size(header: &pingora::http::RequestHeader) -> usize {
    let line = header.method.as_str().len() + header.raw_path().len() + 12;
    header.headers.iter().fold(line, |sum, (name, value)| {
        sum + name.as_str().len() + value.len() + 4
    })
}

/// Reads the whole request body, refusing it past `limit` bytes.
async fn read_body(session: &mut Session, limit: usize) -> Result<Bytes, ApiError> {
    let declared = session
        .req_header()
        .headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::request_too_large(limit));
    }
    let mut body = BytesMut::with_capacity(declared.unwrap_or(0));
    while let Some(chunk) = session
        .read_request_body()
        .await
        .map_err(|e| ApiError::bad_request(format!("Could not read the request body: {e}")))?
    {
        if body.len() + chunk.len() > limit {
            return Err(ApiError::request_too_large(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// A fresh request id: 24 hex digits (96 random bits) behind `req_`.
fn new_request_id() -> String {
    crate::ids::random_id("req_")
}

/// Keeps a client's `x-request-id` when it is short and plain, so it can be
/// logged and echoed safely.
fn sane_request_id(value: &[u8]) -> Option<String> {
    let ok = !value.is_empty()
        && value.len() <= 128
        && value
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(b));
    ok.then(|| String::from_utf8_lossy(value).into_owned())
}

/// Writes a complete JSON response with the gateway's common headers.
async fn respond_json(
    session: &mut Session,
    ctx: &RequestCtx,
    status: u16,
    body: serde_json::Value,
) -> Result<(), ApiError> {
    let body = Bytes::from(body.to_string());
    let header =
        response_header(status, ctx, body.len()).map_err(|e| ApiError::internal(e.to_string()))?;
    write_complete(session, header, body).await;
    Ok(())
}

fn response_header(status: u16, ctx: &RequestCtx, len: usize) -> pingora::Result<ResponseHeader> {
    let mut header = ResponseHeader::build_no_case(status, Some(4))?;
    header.insert_header("content-type", "application/json")?;
    header.insert_header("content-length", len.to_string())?;
    header.insert_header("x-request-id", &ctx.request_id)?;
    Ok(header)
}

/// Writes a whole response; a client that went away is not an error.
async fn write_complete(session: &mut Session, header: ResponseHeader, body: Bytes) {
    let head_only = session.req_header().method == "HEAD";
    if session
        .write_response_header(Box::new(header), head_only)
        .await
        .is_ok()
        && !head_only
    {
        let _ = session.write_response_body(Some(body), true).await;
    }
}

/// Answers an error in OpenAI's shape.
async fn respond_error(session: &mut Session, ctx: &mut RequestCtx, error: &ApiError) {
    ctx.error_reason = Some(error.reason());
    let body = error.body();
    let Ok(mut header) = response_header(error.status, ctx, body.len()) else {
        return;
    };
    if let Some(ms) = error.retry_after_ms {
        let _ = header.insert_header("retry-after", ms.div_ceil(1000).to_string());
        let _ = header.insert_header("retry-after-ms", ms.to_string());
    }
    for (name, value) in &error.headers {
        let _ = header.insert_header(name.clone(), value.clone());
    }
    if error.status == 405 {
        let _ = header.insert_header("allow", "POST");
    }
    if matches!(error.status, 400 | 413 | 431) {
        // The rest of the body may still be on the wire: do not try to
        // read past it for the next request.
        session.set_keepalive(None);
    }
    write_complete(session, header, body).await;
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> Self::CTX {
        RequestCtx {
            started: Instant::now(),
            request_id: String::new(),
            tenant: None,
            route: None,
            provider: None,
            error_reason: None,
            grant: None,
            rate_limit_headers: Vec::new(),
            prompt_estimate: 0,
            strip_usage: false,
            usage: None,
            attempts: 0,
            endpoint: "other",
            backend: None,
            target: None,
            first_byte_at: None,
            upstream_time: std::time::Duration::ZERO,
            parked: std::time::Duration::ZERO,
            cost_pusd: 0,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        ctx.started = Instant::now();
        // HTTP/1.1 pipelining: a request sent before the previous answer is
        // served after it, in order (RFC 9112 9.3.2), rather than dropped
        // with the connection.
        session.as_downstream_mut().set_pipelining_enabled(true);
        ctx.request_id = session
            .req_header()
            .headers
            .get("x-request-id")
            .and_then(|v| sane_request_id(v.as_bytes()))
            .unwrap_or_else(new_request_id);
        // A panic anywhere below is a bug, but it must not take the
        // connection down unanswered or strand the tenant's slot: the grant
        // (in `ctx` or dropped while unwinding) is released either way.
        let served = AssertUnwindSafe(self.serve(session, ctx))
            .catch_unwind()
            .await;
        match served {
            Ok(Ok(())) => {}
            Ok(Err(error)) => respond_error(session, ctx, &error).await,
            Err(_) => {
                tracing::error!(request_id = %ctx.request_id, "the gateway failed while serving a request");
                session.set_keepalive(None);
                if session.response_written().is_none() {
                    let error = ApiError::internal("The gateway failed to handle the request.");
                    respond_error(session, ctx, &error).await;
                } else {
                    ctx.error_reason = Some("gateway_internal");
                }
            }
        }
        Ok(true)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        // request_filter answers every request (see the module docs).
        Error::e_explain(
            InternalError,
            "runestone forwards from request_filter; upstream_peer is unused",
        )
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut Self::CTX,
    ) -> FailToProxy
    where
        Self::CTX: Send + Sync,
    {
        let error = ApiError::internal(format!(
            "The gateway failed to handle the request: {}",
            e.etype().as_str()
        ));
        respond_error(session, ctx, &error).await;
        FailToProxy {
            error_code: error.status,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Self::CTX) {
        let status = session.response_written().map_or(0, |h| h.status.as_u16());
        let (tenant, model) = self.labels(ctx);
        let provider = ctx
            .provider
            .map_or("", |p| self.upstreams.provider(p).settings.name.as_str());
        let [t, m, p] = label_key(ctx);
        metrics::child(&metrics::REQUESTS, [t, m, p, u32::from(status)], |v| {
            v.with_label_values(&[tenant, model, provider, &status.to_string()])
        })
        .inc();
        let elapsed = ctx.started.elapsed();
        let ttft = ctx.first_byte_at.map(|at| at.duration_since(ctx.started));
        if ctx.route.is_some() {
            metrics::child(&metrics::REQUEST_DURATION, [m, p, 0, 0], |v| {
                v.with_label_values(&[model, provider])
            })
            .observe(elapsed.as_secs_f64());
            if let Some(ttft) = ttft {
                metrics::child(&metrics::TIME_TO_FIRST_TOKEN, [m, p, 0, 0], |v| {
                    v.with_label_values(&[model, provider])
                })
                .observe(ttft.as_secs_f64());
            }
            let overhead = elapsed
                .saturating_sub(ctx.upstream_time)
                .saturating_sub(ctx.parked);
            metrics::GATEWAY_OVERHEAD.observe(overhead.as_secs_f64());
        }
        if let Some(reason) = ctx.error_reason {
            metrics::ERRORS.with_label_values(&[reason]).inc();
        }
        // Normally settled before the last byte went out; this covers
        // requests that ended otherwise (errors, disconnects).
        self.settle(ctx).await;
        if self.config.server.access_log {
            let usage = ctx.usage.unwrap_or_default();
            let line = access_log::Line {
                request_id: &ctx.request_id,
                tenant,
                endpoint: ctx.endpoint,
                model,
                provider,
                backend: ctx.backend,
                status,
                prompt_tokens: usage.prompt_tokens,
                completion_tokens: usage.completion_tokens,
                usage_estimated: usage.estimated,
                cost_usd: ctx.cost_pusd as f64 / crate::config::PICO_PER_USD,
                duration: elapsed,
                ttft,
                attempts: ctx.attempts,
                overflow_wait: ctx.parked,
                error: ctx.error_reason,
            };
            access_log::write(&line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_plain_client_request_ids_only() {
        assert_eq!(
            sane_request_id(b"abc-123_x.y:z").as_deref(),
            Some("abc-123_x.y:z")
        );
        assert_eq!(sane_request_id(b""), None);
        assert_eq!(sane_request_id(b"has space"), None);
        assert_eq!(sane_request_id(b"new\nline"), None);
        assert_eq!(sane_request_id(&[b'a'; 129]), None);
    }

    #[test]
    fn formats_resets_like_openai() {
        assert_eq!(format_reset(0), "0ms");
        assert_eq!(format_reset(20), "20ms");
        assert_eq!(format_reset(1000), "1s");
        assert_eq!(format_reset(8640), "8.64s");
        assert_eq!(format_reset(360_000), "6m0s");
        assert_eq!(format_reset(61_500), "1m1.5s");
    }

    #[test]
    fn finds_a_content_length_line_in_a_raw_head() {
        let head = b"POST / HTTP/1.1\r\nHost: x\r\ncontent-LENGTH : 5\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(has_content_length_line(head));
        assert!(!has_content_length_line(
            b"POST /content-length: HTTP/1.1\r\nX-Content-Length: 5\r\n\r\n"
        ));
    }

    #[test]
    fn generated_request_ids_are_unique() {
        let a = new_request_id();
        assert!(a.starts_with("req_") && a.len() == 28, "{a}");
        assert_ne!(a, new_request_id());
    }
}
