//! Forwarding one request to a provider through Pingora's connector, with
//! failover.
//!
//! The body is in hand, so an attempt that fails before anything reached the
//! client (connect error or timeout, no response header in time, a 5xx, the
//! provider's own 429, the provider refusing the gateway's key) moves to the
//! next eligible backend with the whole body replayed, then to the model's
//! fallbacks in order, up to `failover.max_attempts` attempts. Every outcome
//! feeds the backend's circuit breaker.
//!
//! Once the response header has gone to the client there is no retry: the
//! response is streamed chunk by chunk as the provider produces it, each gap
//! bounded by the provider's idle timeout. A provider that breaks off or
//! stalls mid-stream ends the client's stream with an in-band SSE error
//! event and no `[DONE]`, and counts as a failure.

use super::client::Client;
use super::{Gateway, RequestCtx};
use crate::config::{ModelRoute, ProviderKind, ProviderSettings};
use crate::cost::{self, StreamMeter, Usage};
use crate::openai::{ApiError, Endpoint};
use crate::providers::anthropic;
use crate::redact::Redactor;
use crate::upstream::breaker::Outcome;
use crate::upstream::Backend;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::client::HttpSession;
use pingora::{ErrorSource, ErrorType};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tracing::warn;

/// What is forwarded: the routes to try and a way to build the body.
pub(super) struct Request<'a> {
    pub endpoint: Endpoint,
    /// The requested route first, then its fallbacks the tenant may use.
    pub routes: Vec<(usize, &'a ModelRoute)>,
    pub stream: bool,
    /// The upstream body for the provider's model name.
    pub body_for: &'a (dyn Fn(&str) -> Bytes + Sync),
}

/// How an attempt ended, when it did not succeed.
enum Failure {
    /// Nothing reached the client: another backend may be tried.
    Retryable(ApiError),
    /// Nothing reached the client, and another backend would fare no better.
    Final(ApiError),
    /// The client already has part of the answer, or went away.
    Done,
}

/// How copying the response body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyEnd {
    Complete,
    ClientGone,
    ProviderBroke,
}

/// Client request headers passed on to providers; everything else
/// (hop-by-hop headers, cookies, the tenant's credentials) stays behind.
const FORWARDED_REQUEST_HEADERS: [HeaderName; 3] = [
    header::ACCEPT,
    header::USER_AGENT,
    HeaderName::from_static("openai-beta"),
];

/// Provider response headers passed on to clients. Provider rate-limit
/// headers describe the shared account, not the tenant, and are dropped.
const FORWARDED_RESPONSE_HEADERS: [HeaderName; 5] = [
    header::CONTENT_TYPE,
    header::CONTENT_LENGTH,
    header::CACHE_CONTROL,
    HeaderName::from_static("openai-processing-ms"),
    HeaderName::from_static("openai-version"),
];

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Forwards the request, failing over until a backend answers.
pub(super) async fn forward(
    gateway: &Gateway,
    client: &mut dyn Client,
    ctx: &mut RequestCtx,
    request: Request<'_>,
) -> Result<(), ApiError> {
    let max_attempts = gateway.config.max_attempts;
    let mut tried: Vec<(usize, SocketAddr)> = Vec::new();
    let mut last_error: Option<ApiError> = None;
    let mut soonest: Option<Duration> = None;
    'routes: for &(route_index, route) in &request.routes {
        loop {
            if ctx.attempts as usize >= max_attempts {
                break 'routes;
            }
            let backend = match gateway.upstreams.choose_backend(route_index, route, &tried) {
                Ok(backend) => backend,
                Err(none) => {
                    soonest = match (soonest, none.retry_after) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    continue 'routes;
                }
            };
            tried.push((backend.provider, backend.addr));
            ctx.attempts += 1;
            ctx.provider = Some(backend.provider);
            ctx.route = Some(route_index);
            ctx.backend = Some(backend.addr);
            ctx.target = Some(backend.target);
            let attempt_started = Instant::now();
            let result = attempt(gateway, client, ctx, &request, route, &backend).await;
            ctx.upstream_time += attempt_started.elapsed();
            match result {
                Ok(()) | Err(Failure::Done) => return Ok(()),
                Err(Failure::Final(error)) => return Err(error),
                Err(Failure::Retryable(error)) => {
                    warn!(request_id = %ctx.request_id, provider = %gateway.upstreams.provider(backend.provider).settings.name,
                          backend = %backend.addr, attempt = ctx.attempts, error = %error, "attempt failed; failing over");
                    last_error = Some(error);
                }
            }
        }
    }
    Err(last_error.unwrap_or_else(|| {
        let mut error = ApiError::no_healthy_upstream(&request.routes[0].1.name);
        error.retry_after_ms = Some(soonest.map_or(1000, |d| d.as_millis().max(1) as u64));
        error
    }))
}

/// One attempt against one backend.
async fn attempt(
    gateway: &Gateway,
    client: &mut dyn Client,
    ctx: &mut RequestCtx,
    request: &Request<'_>,
    route: &ModelRoute,
    backend: &Backend,
) -> Result<(), Failure> {
    let upstreams = &gateway.upstreams;
    let provider = &upstreams.provider(backend.provider).settings;
    let timeouts = provider.timeouts;
    let started = Instant::now();
    let deadline = started + timeouts.total;
    let provider_model = &route.targets[backend.target].model;
    let fail = |outcome: Outcome, failure: Failure| {
        upstreams.record_outcome(backend, outcome, None);
        failure
    };
    let body = (request.body_for)(provider_model);
    let body = match provider.kind {
        ProviderKind::Anthropic if request.endpoint != Endpoint::ChatCompletions => {
            return Err(fail(
                Outcome::Neutral,
                Failure::Retryable(ApiError::invalid_field(
                    "model",
                    format!(
                        "the provider '{}' serves chat completions only",
                        provider.name
                    ),
                )),
            ));
        }
        ProviderKind::Anthropic => Bytes::from(
            anthropic::to_messages_request(&body, provider_model)
                .map_err(|e| fail(Outcome::Neutral, Failure::Final(e)))?,
        ),
        ProviderKind::OpenAi | ProviderKind::Azure => body,
    };
    let peer = upstreams.peer(backend);
    let io_error = |e: Box<pingora::Error>| {
        let (outcome, failure) = classify(provider, backend, &e);
        fail(outcome, failure)
    };

    let (mut upstream, reused) = match gateway.connector.reused_http_session(&peer).await {
        Some(pooled) => (HttpSession::H1(pooled), true),
        None => {
            // Boxed: connecting (TLS included) is a large future, and held
            // inline it would enlarge every request's state for the life of
            // its stream.
            let (fresh, reused) = Box::pin(gateway.connector.get_http_session(&peer))
                .await
                .map_err(io_error)?;
            (HttpSession::H1(fresh), reused)
        }
    };
    let header = upstream_request(
        provider,
        provider_model,
        request.endpoint,
        client.request_headers(),
        ctx,
        body.len(),
    )
    .map_err(|e| {
        Failure::Final(ApiError::internal(format!(
            "cannot build the upstream request: {e}"
        )))
    })?;
    let sent = async {
        upstream.write_request_header(Box::new(header)).await?;
        upstream.write_request_body(body, true).await?;
        upstream.finish_request_body().await
    };
    if let Err(e) = sent.await {
        // A pooled connection the provider had closed says nothing about it.
        let outcome = if reused {
            Outcome::Neutral
        } else {
            classify(provider, backend, &e).0
        };
        return Err(fail(
            outcome,
            Failure::Retryable(ApiError::upstream_error(format!(
                "Sending the request to the provider '{}' failed.",
                provider.name
            ))),
        ));
    }

    let first_byte = timeouts
        .first_byte
        .min(deadline.saturating_duration_since(Instant::now()));
    tokio::select! {
        read = tokio::time::timeout(first_byte, upstream.read_response_header()) => match read {
            Ok(read) => read.map_err(io_error)?,
            Err(_) => return Err(fail(Outcome::Failure, Failure::Retryable(ApiError::upstream_timeout(format!(
                "The provider '{}' sent no response within {first_byte:?}.", provider.name
            ))))),
        },
        _ = client.gone() => {
            upstreams.record_outcome(backend, Outcome::Neutral, None);
            return Err(Failure::Done);
        }
    }
    let ttfb = started.elapsed();
    // Borrowed, not cloned: everything read from it is read before the body.
    let upstream_header = upstream
        .response_header()
        .expect("read_response_header succeeded");
    let status = upstream_header.status.as_u16();
    if let Some((outcome, error)) = refused(provider, upstream_header) {
        warn!(request_id = %ctx.request_id, provider = %provider.name, backend = %backend.addr, status, "provider refused the attempt");
        return Err(fail(outcome, Failure::Retryable(error)));
    }

    if provider.kind == ProviderKind::Anthropic && !is_event_stream(upstream_header) {
        let upstream_header = upstream_header.clone();
        return anthropic_json(
            gateway,
            client,
            ctx,
            route,
            backend,
            &mut upstream,
            &upstream_header,
            ttfb,
        )
        .await;
    }
    let mut meter = match provider.kind {
        ProviderKind::Anthropic => Meter::Anthropic(anthropic::StreamTranslator::new(
            &route.name,
            !ctx.strip_usage,
        )),
        _ => Meter::for_response(upstream_header, ctx.strip_usage),
    };
    // Whatever the provider sends on, its key never reaches the client.
    let mut redactor = Redactor::new(provider.api_key.as_ref().map(|k| k.expose()));
    let response = client_response(upstream_header, ctx, &provider.name, &meter, &redactor)
        .map_err(|e| {
            Failure::Final(ApiError::internal(format!(
                "cannot build the response header: {e}"
            )))
        })?;
    let declared_len = upstream_header
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|_| !meter.edits_body());
    if !client.send_header(response).await {
        upstreams.record_outcome(backend, Outcome::Neutral, None);
        return Err(Failure::Done);
    }
    let copy = Copy {
        gateway,
        is_stream: request.stream,
        provider,
        declared_len,
        idle: timeouts.idle,
        deadline,
        backend,
        ttfb,
        finished: std::sync::atomic::AtomicBool::new(false),
    };
    let end = copy
        .run(client, &mut upstream, ctx, &mut meter, &mut redactor)
        .await;
    if !copy.finished.load(std::sync::atomic::Ordering::Relaxed) {
        // Not settled before the end (a broken or abandoned body): what
        // the meter saw is what the request used.
        ctx.usage = Some(meter.usage(ctx.prompt_estimate));
        let outcome = match end {
            BodyEnd::Complete => Outcome::Success,
            BodyEnd::ProviderBroke => Outcome::Failure,
            BodyEnd::ClientGone => Outcome::Neutral,
        };
        upstreams.record_outcome(backend, outcome, Some(ttfb));
    }
    if let (BodyEnd::Complete, true, HttpSession::H1(done)) =
        (end, upstream.response_done(), upstream)
    {
        gateway
            .connector
            .release_http_session(done, &peer, peer.options.idle_timeout)
            .await;
    }
    Ok(())
}

/// Whether a response is an SSE stream.
fn is_event_stream(header: &ResponseHeader) -> bool {
    header
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}

/// An Anthropic JSON answer is read whole and translated before anything
/// goes to the client (its length changes); an error answer becomes the
/// OpenAI error of the same class.
#[allow(clippy::too_many_arguments)]
async fn anthropic_json(
    gateway: &Gateway,
    client: &mut dyn Client,
    ctx: &mut RequestCtx,
    route: &ModelRoute,
    backend: &Backend,
    upstream: &mut HttpSession,
    header: &ResponseHeader,
    ttfb: Duration,
) -> Result<(), Failure> {
    let upstreams = &gateway.upstreams;
    let provider = &upstreams.provider(backend.provider).settings;
    let mut body = Vec::new();
    loop {
        match tokio::time::timeout(provider.timeouts.idle, upstream.read_response_body()).await {
            Ok(Ok(Some(chunk))) if body.len() + chunk.len() <= cost::MAX_METERED_JSON_BYTES => {
                body.extend_from_slice(&chunk)
            }
            Ok(Ok(None)) => break,
            _ => {
                upstreams.record_outcome(backend, Outcome::Failure, None);
                return Err(Failure::Retryable(ApiError::upstream_error(format!(
                    "The provider '{}' broke off its answer.",
                    provider.name
                ))));
            }
        }
    }
    let status = header.status.as_u16();
    if !header.status.is_success() {
        upstreams.record_outcome(backend, Outcome::Success, Some(ttfb));
        let redactor = Redactor::new(provider.api_key.as_ref().map(|k| k.expose()));
        return Err(Failure::Final(anthropic::to_openai_error(
            status,
            &redactor.redact(&body),
        )));
    }
    let (answer, usage) = anthropic::to_chat_completion(&body, &route.name).map_err(|e| {
        upstreams.record_outcome(backend, Outcome::Failure, None);
        Failure::Retryable(e)
    })?;
    ctx.usage = Some(usage);
    gateway.settle(ctx).await;
    upstreams.record_outcome(backend, Outcome::Success, Some(ttfb));
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(answer.len()));
    add_gateway_headers(&mut parts.headers, ctx, &provider.name)
        .map_err(|e| Failure::Final(ApiError::internal(e.to_string())))?;
    let out = ResponseHeader::from(parts);
    if client.send_header(out).await {
        ctx.first_byte_at.get_or_insert_with(Instant::now);
        let redactor = Redactor::new(provider.api_key.as_ref().map(|k| k.expose()));
        let answer = match redactor.redact(&answer) {
            std::borrow::Cow::Borrowed(_) => Bytes::from(answer),
            std::borrow::Cow::Owned(redacted) => Bytes::from(redacted),
        };
        client.send_body(answer, true).await;
    }
    Ok(())
}

/// A response that must not reach the client, with what the breaker should
/// make of it: a 5xx (failure), the provider's own 429 (cool-down), or a
/// 401/403 that means the gateway's key was refused (the tenant's key was
/// fine, so the client must not see an authentication error).
fn refused(provider: &ProviderSettings, header: &ResponseHeader) -> Option<(Outcome, ApiError)> {
    let name = &provider.name;
    let status = header.status.as_u16();
    match status {
        500..=599 => Some((
            Outcome::Failure,
            ApiError::upstream_error(format!("The provider '{name}' answered {status}.")),
        )),
        429 => {
            let retry_after = header
                .headers
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(|s| Duration::from_secs_f64(s.min(3600.0)));
            let mut error = ApiError::provider_rate_limited(name);
            error.retry_after_ms = Some(retry_after.map_or(1000, |d| d.as_millis() as u64));
            Some((Outcome::RateLimited(retry_after), error))
        }
        401 | 403 => Some((
            Outcome::Neutral,
            ApiError::upstream_error(format!(
                "The provider '{name}' refused the gateway's credentials."
            )),
        )),
        _ => None,
    }
}

/// Reads usage from a response on its way to the client.
enum Meter {
    /// An error answer: the provider generated nothing. It is held (up to
    /// a bound) and sent whole at the end.
    Error { body: Vec<u8> },
    /// A JSON body, kept (up to a bound) to read its `usage` at the end.
    Json { body: Vec<u8>, seen: usize },
    /// An SSE stream, metered event by event.
    Stream(StreamMeter),
    /// An Anthropic SSE stream, translated event by event.
    Anthropic(anthropic::StreamTranslator),
}

impl Meter {
    fn for_response(header: &ResponseHeader, strip_usage: bool) -> Self {
        match (header.status.is_success(), is_event_stream(header)) {
            (false, _) => Meter::Error { body: Vec::new() },
            (true, true) => Meter::Stream(StreamMeter::new(strip_usage)),
            (true, false) => Meter::Json {
                body: Vec::new(),
                seen: 0,
            },
        }
    }

    /// Whether the meter edits the body (so its length changes).
    fn edits_body(&self) -> bool {
        matches!(self, Meter::Stream(m) if m.strips_usage())
            || matches!(self, Meter::Anthropic(_) | Meter::Error { .. })
    }

    /// Takes an upstream chunk, returns what to send on.
    fn feed(&mut self, chunk: Bytes) -> Bytes {
        match self {
            Meter::Error { body, .. } => {
                if body.len() + chunk.len() <= cost::MAX_METERED_JSON_BYTES {
                    body.extend_from_slice(&chunk);
                }
                Bytes::new()
            }
            Meter::Json { body, seen } => {
                *seen += chunk.len();
                if *seen <= cost::MAX_METERED_JSON_BYTES {
                    body.extend_from_slice(&chunk);
                }
                chunk
            }
            Meter::Stream(meter) => meter.feed(chunk),
            Meter::Anthropic(translator) => translator.feed(&chunk),
        }
    }

    /// The end of the upstream body: what is still to be sent.
    fn finish(&mut self) -> Bytes {
        match self {
            Meter::Stream(meter) => meter.finish(),
            Meter::Error { body } => Bytes::from(std::mem::take(body)),
            _ => Bytes::new(),
        }
    }

    fn usage(&self, prompt_estimate: u64) -> Usage {
        match self {
            Meter::Error { .. } => Usage::default(),
            Meter::Json { body, seen } if *seen <= cost::MAX_METERED_JSON_BYTES => {
                cost::usage_from_json(body, prompt_estimate)
            }
            Meter::Json { seen, .. } => Usage {
                prompt_tokens: prompt_estimate,
                completion_tokens: (*seen as u64).div_ceil(4),
                cached_tokens: 0,
                estimated: true,
            },
            Meter::Stream(meter) => meter.usage(prompt_estimate),
            Meter::Anthropic(translator) => translator.usage().unwrap_or(Usage {
                prompt_tokens: prompt_estimate,
                completion_tokens: translator.generated_bytes().div_ceil(4),
                cached_tokens: 0,
                estimated: true,
            }),
        }
    }
}

/// Copies the response body chunk by chunk, as the provider produces it,
/// through the meter.
struct Copy<'a> {
    gateway: &'a Gateway,
    is_stream: bool,
    provider: &'a ProviderSettings,
    /// The provider's `content-length`, when it sent one.
    declared_len: Option<usize>,
    /// Longest gap between two chunks.
    idle: Duration,
    /// End of the attempt's total time.
    deadline: Instant,
    /// The backend answering, and how long its first byte took.
    backend: &'a Backend,
    ttfb: Duration,
    /// Set once the response is known complete and accounted for.
    finished: std::sync::atomic::AtomicBool,
}

impl Copy<'_> {
    async fn run(
        &self,
        client: &mut dyn Client,
        upstream: &mut HttpSession,
        ctx: &mut RequestCtx,
        meter: &mut Meter,
        redactor: &mut Redactor,
    ) -> BodyEnd {
        let mut received = 0;
        loop {
            let gap = self
                .idle
                .min(self.deadline.saturating_duration_since(Instant::now()));
            let read = tokio::select! {
                read = tokio::time::timeout(gap, upstream.read_response_body()) => read,
                _ = client.gone() => return BodyEnd::ClientGone,
            };
            match read {
                Ok(Ok(Some(chunk))) => {
                    received += chunk.len();
                    let out = redactor.feed(meter.feed(chunk));
                    if self.declared_len.is_some_and(|n| received >= n) {
                        // The client knows the body is whole once it has
                        // these bytes: settle first, so a client that sends
                        // its next request at once finds its slot free.
                        self.settle(ctx, meter).await;
                    }
                    if !out.is_empty() {
                        ctx.first_byte_at.get_or_insert_with(Instant::now);
                        if !client.send_body(out, false).await {
                            return BodyEnd::ClientGone;
                        }
                    }
                }
                Ok(Ok(None)) => {
                    let rest = redactor.feed(meter.finish());
                    let held = redactor.finish();
                    let rest = if held.is_empty() {
                        rest
                    } else {
                        Bytes::from([&rest[..], &held[..]].concat())
                    };
                    self.settle(ctx, meter).await;
                    client.send_body(rest, true).await;
                    return BodyEnd::Complete;
                }
                Ok(Err(e)) => {
                    warn!(request_id = %ctx.request_id, provider = %self.provider.name, error = %e, "provider broke off the response");
                    self.end_broken(
                        client,
                        format!(
                            "The provider '{}' broke off the response.",
                            self.provider.name
                        ),
                    )
                    .await;
                    ctx.error_reason = Some("provider_stream_broken");
                    return BodyEnd::ProviderBroke;
                }
                Err(_) => {
                    warn!(request_id = %ctx.request_id, provider = %self.provider.name, gap = ?gap, "provider stalled mid-response");
                    self.end_broken(
                        client,
                        format!("The provider '{}' stalled for {gap:?}.", self.provider.name),
                    )
                    .await;
                    ctx.error_reason = Some("provider_stream_broken");
                    return BodyEnd::ProviderBroke;
                }
            }
        }
    }

    /// Ends a response the provider did not finish: a stream gets an
    /// in-band error event and a clean end (no `[DONE]`, so SDKs raise); a
    /// JSON body cannot be repaired, so the connection is closed and the
    /// client sees the truncation.
    async fn end_broken(&self, client: &mut dyn Client, message: String) {
        if self.is_stream {
            let event = ApiError::upstream_error(message).sse_event();
            client.send_body(event, true).await;
        } else {
            client.abort();
        }
    }

    /// The whole answer is in hand: settle the admission and tell the
    /// breaker, before the client can see the end of the response (so its
    /// next request finds the slot free and the breaker up to date).
    async fn settle(&self, ctx: &mut RequestCtx, meter: &Meter) {
        if self
            .finished
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        ctx.usage = Some(meter.usage(ctx.prompt_estimate));
        self.gateway.settle(ctx).await;
        self.gateway
            .upstreams
            .record_outcome(self.backend, Outcome::Success, Some(self.ttfb));
    }
}

/// Maps a connector or I/O error to the breaker outcome and what the client
/// should see.
fn classify(
    provider: &ProviderSettings,
    backend: &Backend,
    e: &pingora::Error,
) -> (Outcome, Failure) {
    let name = &provider.name;
    match e.etype() {
        _ if e.esource() == &ErrorSource::Downstream => (Outcome::Neutral, Failure::Done),
        ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => (
            Outcome::Failure,
            Failure::Retryable(ApiError::upstream_timeout(format!(
                "The provider '{name}' timed out."
            ))),
        ),
        _ => (
            Outcome::Failure,
            Failure::Retryable(ApiError::upstream_error(format!(
                "The provider '{name}' could not be reached ({}) at {}.",
                e.etype().as_str(),
                backend.addr
            ))),
        ),
    }
}

/// An error building a header from parts that should always be valid.
type HeaderError = Box<dyn std::error::Error + Send + Sync>;

/// The request header sent to the provider: its path, host and key; the
/// tenant's credentials never leave the gateway. Built on `http`'s types
/// directly (no header-case map): names are constants, values mostly shared.
fn upstream_request(
    provider: &ProviderSettings,
    provider_model: &str,
    endpoint: Endpoint,
    client_headers: &HeaderMap,
    ctx: &RequestCtx,
    body_len: usize,
) -> Result<RequestHeader, HeaderError> {
    let base = &provider.base_url.path;
    let suffix = endpoint.provider_suffix();
    let path = match provider.kind {
        ProviderKind::OpenAi => format!("{base}{suffix}"),
        // The deployment is the target's model name; the version is checked
        // at config load to be URL-safe.
        ProviderKind::Azure => format!(
            "{base}/openai/deployments/{}{suffix}?api-version={}",
            url::form_urlencoded::byte_serialize(provider_model.as_bytes()).collect::<String>(),
            provider.api_version.as_deref().unwrap_or_default()
        ),
        // As the Anthropic SDK does: the base URL, then /v1/messages.
        ProviderKind::Anthropic => format!("{base}/v1/messages"),
    };
    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.method = http::Method::POST;
    parts.uri = http::Uri::try_from(path)?;
    let headers = &mut parts.headers;
    headers.reserve(12);
    headers.insert(
        header::HOST,
        HeaderValue::from_str(&provider.base_url.authority)?,
    );
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body_len));
    // Usage is read from the body on its way through: keep it uncompressed.
    headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    headers.insert(X_REQUEST_ID, HeaderValue::from_str(&ctx.request_id)?);
    if let Some(key) = &provider.api_key {
        let (name, value) = match provider.kind {
            ProviderKind::OpenAi => (header::AUTHORIZATION, format!("Bearer {}", key.expose())),
            ProviderKind::Azure => (HeaderName::from_static("api-key"), key.expose().to_string()),
            ProviderKind::Anthropic => (
                HeaderName::from_static("x-api-key"),
                key.expose().to_string(),
            ),
        };
        let mut value = HeaderValue::try_from(value)?;
        value.set_sensitive(true);
        headers.insert(name, value);
    }
    if provider.kind == ProviderKind::Anthropic {
        headers.insert(
            HeaderName::from_static("anthropic-version"),
            HeaderValue::from_static(anthropic::API_VERSION),
        );
    }
    for name in FORWARDED_REQUEST_HEADERS {
        if let Some(value) = client_headers.get(&name) {
            headers.insert(name, value.clone());
        }
    }
    for (name, value) in client_headers {
        if name.as_str().starts_with("x-stainless-") {
            headers.append(name.clone(), value.clone());
        }
    }
    Ok(RequestHeader::from(parts))
}

/// The response header sent to the client: the provider's status and an
/// allow-list of its headers, plus the gateway's own.
fn client_response(
    upstream: &ResponseHeader,
    ctx: &RequestCtx,
    provider: &str,
    meter: &Meter,
    redactor: &Redactor,
) -> Result<ResponseHeader, HeaderError> {
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = upstream.status;
    parts.headers.reserve(16);
    // A provider echoing its key in a header gets it overwritten there too.
    let redacted = |value: &HeaderValue| match redactor.redact(value.as_bytes()) {
        std::borrow::Cow::Borrowed(_) => Ok(value.clone()),
        std::borrow::Cow::Owned(bytes) => HeaderValue::from_bytes(&bytes),
    };
    for name in FORWARDED_RESPONSE_HEADERS {
        if name == header::CONTENT_LENGTH && meter.edits_body() {
            continue;
        }
        if let Some(value) = upstream.headers.get(&name) {
            parts.headers.insert(name, redacted(value)?);
        }
    }
    if let Some(id) = upstream.headers.get(X_REQUEST_ID) {
        parts.headers.insert(
            HeaderName::from_static("x-upstream-request-id"),
            redacted(id)?,
        );
    }
    add_gateway_headers(&mut parts.headers, ctx, provider)?;
    Ok(ResponseHeader::from(parts))
}

/// The gateway's own headers on a proxied answer: the tenant's rate limits,
/// the request id, who served and after how many attempts.
fn add_gateway_headers(
    headers: &mut HeaderMap,
    ctx: &RequestCtx,
    provider: &str,
) -> Result<(), HeaderError> {
    for (name, value) in &ctx.rate_limit_headers {
        headers.insert(name.clone(), value.clone());
    }
    headers.insert(X_REQUEST_ID, HeaderValue::from_str(&ctx.request_id)?);
    headers.insert(
        HeaderName::from_static("x-runestone-provider"),
        HeaderValue::from_str(provider)?,
    );
    headers.insert(
        HeaderName::from_static("x-runestone-attempts"),
        HeaderValue::from(ctx.attempts),
    );
    Ok(())
}
