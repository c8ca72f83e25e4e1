//! Forwarding one request to a provider through Pingora's connector.
//!
//! The body is in hand, so an attempt that fails before anything reached
//! the client (connect error, a reused connection that was closed, the
//! provider refusing the gateway's credentials) moves to the route's next
//! target with the whole body replayed. Once the response header has gone
//! to the client, the response is streamed chunk by chunk as the provider
//! produces it; a provider that breaks off mid-stream ends the client's
//! stream with an in-band SSE error event and no `[DONE]`.

use super::{Gateway, RequestCtx};
use crate::config::ProviderSettings;
use crate::cost::{self, StreamMeter, Usage};
use crate::openai::{ApiError, Endpoint};
use crate::upstream::Backend;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::client::HttpSession;
use pingora::proxy::Session;
use pingora::{ErrorSource, ErrorType};
use tracing::warn;

/// What is forwarded: the route and a way to build the body for a target.
pub(super) struct Request<'a> {
    pub endpoint: Endpoint,
    pub route_index: usize,
    pub route: &'a crate::config::ModelRoute,
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

/// Client request headers passed on to providers; everything else
/// (hop-by-hop headers, cookies, the tenant's credentials) stays behind.
const FORWARDED_REQUEST_HEADERS: &[&str] = &["accept", "user-agent", "openai-beta"];

/// Provider response headers passed on to clients. Provider rate-limit
/// headers describe the shared account, not the tenant, and are dropped.
const FORWARDED_RESPONSE_HEADERS: &[&str] = &[
    "content-type",
    "content-length",
    "cache-control",
    "openai-processing-ms",
    "openai-version",
];

/// Forwards the request, trying the route's targets until one answers.
pub(super) async fn forward(
    gateway: &Gateway,
    session: &mut Session,
    ctx: &mut RequestCtx,
    request: Request<'_>,
) -> Result<(), ApiError> {
    let mut tried: Vec<usize> = Vec::new();
    let mut last_error = None;
    while let Some(backend) =
        gateway
            .upstreams
            .choose_backend(request.route_index, request.route, &tried)
    {
        tried.push(backend.target);
        ctx.provider = Some(backend.provider);
        match attempt(gateway, session, ctx, &request, &backend).await {
            Ok(()) | Err(Failure::Done) => return Ok(()),
            Err(Failure::Final(error)) => return Err(error),
            Err(Failure::Retryable(error)) => {
                warn!(request_id = %ctx.request_id, provider = %gateway.upstreams.provider(backend.provider).settings.name,
                      backend = %backend.addr, error = %error, "attempt failed; trying the next target");
                last_error = Some(error);
            }
        }
    }
    Err(last_error.unwrap_or_else(|| ApiError::no_healthy_upstream(&request.route.name)))
}

/// One attempt against one backend.
async fn attempt(
    gateway: &Gateway,
    session: &mut Session,
    ctx: &mut RequestCtx,
    request: &Request<'_>,
    backend: &Backend,
) -> Result<(), Failure> {
    let provider = &gateway.upstreams.provider(backend.provider).settings;
    let target = &request.route.targets[backend.target];
    let body = (request.body_for)(&target.model);
    let peer = gateway.upstreams.peer(backend);
    let upstream_error = |e: Box<pingora::Error>| classify(provider, backend, &e);

    let (mut upstream, _reused) = gateway
        .connector
        .get_http_session(&peer)
        .await
        .map_err(upstream_error)?;
    let header =
        upstream_request(provider, request.endpoint, session, ctx, body.len()).map_err(|e| {
            Failure::Final(ApiError::internal(format!(
                "cannot build the upstream request: {e}"
            )))
        })?;
    upstream
        .write_request_header(Box::new(header))
        .await
        .map_err(upstream_error)?;
    upstream
        .write_request_body(body, true)
        .await
        .map_err(upstream_error)?;
    upstream
        .finish_request_body()
        .await
        .map_err(upstream_error)?;

    tokio::select! {
        read = upstream.read_response_header() => read.map_err(upstream_error)?,
        _ = session.downstream_session.read_body_or_idle(true) => return Err(Failure::Done),
    }
    let upstream_header = upstream
        .response_header()
        .expect("read_response_header succeeded")
        .clone();
    if matches!(upstream_header.status.as_u16(), 401 | 403) {
        // The provider refused the gateway's own key: the tenant's key was
        // fine, so the client must not see an authentication error.
        warn!(provider = %provider.name, status = upstream_header.status.as_u16(), "provider refused the gateway's credentials");
        return Err(Failure::Retryable(ApiError::upstream_error(format!(
            "The provider '{}' refused the gateway's credentials.",
            provider.name
        ))));
    }

    let mut meter = Meter::for_response(&upstream_header, ctx.strip_usage);
    let header = client_response(&upstream_header, ctx, &provider.name, &meter).map_err(|e| {
        Failure::Final(ApiError::internal(format!(
            "cannot build the response header: {e}"
        )))
    })?;
    if session
        .write_response_header(Box::new(header), false)
        .await
        .is_err()
    {
        return Err(Failure::Done);
    }
    let declared_len = upstream_header
        .headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|_| !meter.edits_body());
    let copy = Copy {
        gateway,
        is_stream: request.stream,
        provider,
        declared_len,
    };
    copy.run(session, &mut upstream, ctx, &mut meter).await;
    ctx.usage = Some(meter.usage(ctx.prompt_estimate));
    if upstream.response_done() {
        gateway
            .connector
            .release_http_session(upstream, &peer, peer.options.idle_timeout)
            .await;
    }
    Ok(())
}

/// Reads usage from a response on its way to the client.
enum Meter {
    /// An error answer: the provider generated nothing.
    Nothing,
    /// A JSON body, kept (up to a bound) to read its `usage` at the end.
    Json { body: Vec<u8>, seen: usize },
    /// An SSE stream, metered event by event.
    Stream(StreamMeter),
}

impl Meter {
    fn for_response(header: &ResponseHeader, strip_usage: bool) -> Self {
        let is_sse = header
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        match (header.status.is_success(), is_sse) {
            (false, _) => Meter::Nothing,
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
    }

    /// Takes an upstream chunk, returns what to send on.
    fn feed(&mut self, chunk: Bytes) -> Bytes {
        match self {
            Meter::Nothing => chunk,
            Meter::Json { body, seen } => {
                *seen += chunk.len();
                if *seen <= cost::MAX_METERED_JSON_BYTES {
                    body.extend_from_slice(&chunk);
                }
                chunk
            }
            Meter::Stream(meter) => meter.feed(chunk),
        }
    }

    /// The end of the upstream body: what is still to be sent.
    fn finish(&mut self) -> Bytes {
        match self {
            Meter::Stream(meter) => meter.finish(),
            _ => Bytes::new(),
        }
    }

    fn usage(&self, prompt_estimate: u64) -> Usage {
        match self {
            Meter::Nothing => Usage::default(),
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
}

impl Copy<'_> {
    async fn run(
        &self,
        session: &mut Session,
        upstream: &mut HttpSession,
        ctx: &mut RequestCtx,
        meter: &mut Meter,
    ) {
        let mut received = 0;
        loop {
            let read = tokio::select! {
                read = upstream.read_response_body() => read,
                _ = session.downstream_session.read_body_or_idle(true) => return,
            };
            match read {
                Ok(Some(chunk)) => {
                    received += chunk.len();
                    let out = meter.feed(chunk);
                    if self.declared_len.is_some_and(|n| received >= n) {
                        // The client knows the body is whole once it has
                        // these bytes: settle first, so a client that sends
                        // its next request at once finds its slot free.
                        self.settle(ctx, meter).await;
                    }
                    if !out.is_empty()
                        && session.write_response_body(Some(out), false).await.is_err()
                    {
                        return;
                    }
                }
                Ok(None) => {
                    let rest = meter.finish();
                    self.settle(ctx, meter).await;
                    let _ = session.write_response_body(Some(rest), true).await;
                    return;
                }
                Err(e) => {
                    warn!(request_id = %ctx.request_id, provider = %self.provider.name, error = %e, "provider broke off the response");
                    if self.is_stream {
                        let event = ApiError::upstream_error(format!(
                            "The provider '{}' broke off the stream.",
                            self.provider.name
                        ))
                        .sse_event();
                        let _ = session.write_response_body(Some(event), true).await;
                    } else {
                        // A JSON body cut short cannot be repaired: close the
                        // connection so the client sees the truncation.
                        session.set_keepalive(None);
                    }
                    return;
                }
            }
        }
    }

    async fn settle(&self, ctx: &mut RequestCtx, meter: &Meter) {
        ctx.usage = Some(meter.usage(ctx.prompt_estimate));
        self.gateway.settle(ctx).await;
    }
}

/// Maps a connector or I/O error to what the client should see, and whether
/// another backend may be tried.
fn classify(provider: &ProviderSettings, backend: &Backend, e: &pingora::Error) -> Failure {
    let name = &provider.name;
    match e.etype() {
        ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
            Failure::Retryable(ApiError::upstream_timeout(format!(
                "The provider '{name}' timed out."
            )))
        }
        _ if e.esource() == &ErrorSource::Downstream => Failure::Done,
        _ => Failure::Retryable(ApiError::upstream_error(format!(
            "The provider '{name}' could not be reached ({}) at {}.",
            e.etype().as_str(),
            backend.addr
        ))),
    }
}

/// The request header sent to the provider: its path, host and key; the
/// tenant's credentials never leave the gateway.
fn upstream_request(
    provider: &ProviderSettings,
    endpoint: Endpoint,
    session: &Session,
    ctx: &RequestCtx,
    body_len: usize,
) -> pingora::Result<RequestHeader> {
    let path = format!("{}{}", provider.base_url.path, endpoint.provider_suffix());
    let mut header = RequestHeader::build("POST", path.as_bytes(), Some(10))?;
    header.insert_header("host", &provider.base_url.authority)?;
    header.insert_header("content-type", "application/json")?;
    header.insert_header("content-length", body_len.to_string())?;
    // Usage is read from the body on its way through: keep it uncompressed.
    header.insert_header("accept-encoding", "identity")?;
    header.insert_header("x-request-id", &ctx.request_id)?;
    if let Some(key) = &provider.api_key {
        header.insert_header("authorization", format!("Bearer {}", key.expose()))?;
    }
    let client = &session.req_header().headers;
    for name in FORWARDED_REQUEST_HEADERS {
        if let Some(value) = client.get(*name) {
            header.insert_header(*name, value)?;
        }
    }
    for (name, value) in client {
        if name.as_str().starts_with("x-stainless-") {
            header.append_header(name.clone(), value)?;
        }
    }
    Ok(header)
}

/// The response header sent to the client: the provider's status and an
/// allow-list of its headers, plus the gateway's own.
fn client_response(
    upstream: &ResponseHeader,
    ctx: &RequestCtx,
    provider: &str,
    meter: &Meter,
) -> pingora::Result<ResponseHeader> {
    let mut header = ResponseHeader::build(upstream.status, Some(16))?;
    for name in FORWARDED_RESPONSE_HEADERS {
        if *name == "content-length" && meter.edits_body() {
            continue;
        }
        if let Some(value) = upstream.headers.get(*name) {
            header.insert_header(*name, value)?;
        }
    }
    for (name, value) in &ctx.rate_limit_headers {
        header.insert_header(*name, value)?;
    }
    if let Some(id) = upstream.headers.get("x-request-id") {
        header.insert_header("x-upstream-request-id", id)?;
    }
    header.insert_header("x-request-id", &ctx.request_id)?;
    header.insert_header("x-runestone-provider", provider)?;
    Ok(header)
}
