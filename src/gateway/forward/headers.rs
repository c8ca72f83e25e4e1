//! The headers each way: the request header sent to a provider (its path,
//! host and key, and an allow-list of the client's headers), and the
//! response header sent to the client (an allow-list of the provider's,
//! redacted, and the gateway's own).

use super::Exchange;
use crate::config::ProviderSettings;
use crate::gateway::admission::{each_rate_limit_value, rate_limit_header_count, write_number};
use crate::providers::adapter;
use crate::redact::Redactor;
use crate::telemetry::{TRACEPARENT, TRACESTATE};
use bytes::BytesMut;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};

/// An error building a header from parts that should always be valid.
pub(in crate::gateway) type HeaderError = Box<dyn std::error::Error + Send + Sync>;

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

/// The request id, the gateway's to the client and its own upstream.
pub(in crate::gateway) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
// Constants, not `HeaderName::from_static` where used: that checks the
// name on every call.
const X_UPSTREAM_REQUEST_ID: HeaderName = HeaderName::from_static("x-upstream-request-id");
const X_RUNESTONE_PROVIDER: HeaderName = HeaderName::from_static("x-runestone-provider");
const X_RUNESTONE_ATTEMPTS: HeaderName = HeaderName::from_static("x-runestone-attempts");

/// `path` (which may carry a query already) with `tail` added to its path
/// and `query` to its query.
fn with_tail(path: String, tail: &str, query: Option<&str>) -> String {
    if tail.is_empty() && query.is_none() {
        return path;
    }
    let (path, own_query) = match path.split_once('?') {
        Some((path, q)) => (path, Some(q)),
        None => (path.as_str(), None),
    };
    let mut out = format!("{path}{tail}");
    let queries: Vec<&str> = own_query
        .into_iter()
        .chain(query)
        .filter(|q| !q.is_empty())
        .collect();
    if !queries.is_empty() {
        out.push('?');
        out.push_str(&queries.join("&"));
    }
    out
}

/// Whether a response is an SSE stream.
pub(in crate::gateway) fn is_event_stream(header: &ResponseHeader) -> bool {
    has_media_type(header, "text/event-stream")
}

/// Whether a response's content type is `media_type` (with or without
/// parameters), compared without regard to case, as HTTP compares them.
pub(super) fn has_media_type(header: &ResponseHeader, media_type: &str) -> bool {
    let given = header
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::trim_start);
    given.is_some_and(|v| {
        v.get(..media_type.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(media_type))
    })
}

/// The request header sent to the provider: its path, host and key; the
/// tenant's credentials never leave the gateway. Built on `http`'s types
/// directly (no header-case map): names are constants, values mostly shared.
pub(super) fn upstream_request(
    provider: &ProviderSettings,
    provider_model: &str,
    exchange: &Exchange<'_>,
    client_headers: &HeaderMap,
    body_len: usize,
    span_id: Option<[u8; 8]>,
) -> Result<RequestHeader, HeaderError> {
    let kind = adapter(provider.kind);
    let path = kind.path(
        &provider.base_url.path,
        exchange.endpoint,
        provider_model,
        provider.api_version.as_deref(),
    );
    let call = &exchange.call;
    let path = with_tail(path, call.tail, call.query);
    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.method = call.method.clone();
    parts.uri = http::Uri::try_from(path)?;
    let headers = &mut parts.headers;
    headers.reserve(12);
    headers.insert(header::HOST, provider.base_url.host_header.clone());
    if body_len > 0 || call.method == http::Method::POST {
        headers.insert(header::CONTENT_TYPE, call.content_type.clone());
    }
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body_len));
    // Usage is read from the body on its way through: keep it uncompressed.
    headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    let upstream_id = crate::ids::upstream_request_id(exchange.request_id);
    headers.insert(X_REQUEST_ID, HeaderValue::from_str(&upstream_id)?);
    if let Some((name, value)) = &provider.credential {
        headers.insert(name.clone(), value.clone());
    }
    for (name, value) in kind.fixed_headers() {
        headers.insert(*name, HeaderValue::from_static(value));
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
    trace_headers(headers, exchange, client_headers, span_id);
    Ok(RequestHeader::from(parts))
}

/// W3C trace context for the provider: with tracing on, the request's
/// trace with the attempt's span as parent (and the client's
/// `tracestate`); with it off, the client's own, when they are valid.
fn trace_headers(
    headers: &mut HeaderMap,
    exchange: &Exchange<'_>,
    client_headers: &HeaderMap,
    span_id: Option<[u8; 8]>,
) {
    match (exchange.trace, span_id) {
        (Some(trace), Some(span_id)) => {
            headers.insert(TRACEPARENT, trace.traceparent(span_id));
            if let Some(state) = &trace.trace_state {
                headers.insert(TRACESTATE, state.clone());
            }
        }
        _ => {
            if let Some((parent, state)) = crate::telemetry::valid_client_headers(client_headers) {
                headers.insert(TRACEPARENT, parent);
                if let Some(state) = state {
                    headers.insert(TRACESTATE, state);
                }
            }
        }
    }
}

/// The response header sent to the client: the provider's status and an
/// allow-list of its headers (redacted), plus the gateway's own.
/// `edits_body`: the length changes on the way, so none is sent. Boxed,
/// as Pingora sends it: it waits in the attempt for the first content.
pub(super) fn client_response(
    upstream: &ResponseHeader,
    exchange: &Exchange<'_>,
    provider: &str,
    attempts: u32,
    edits_body: bool,
    redactor: &Redactor<'_>,
) -> Result<Box<ResponseHeader>, HeaderError> {
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = upstream.status;
    let forwarded = FORWARDED_RESPONSE_HEADERS.map(|name| {
        let skip = name == header::CONTENT_LENGTH && edits_body;
        let value = upstream.headers.get(&name).filter(|_| !skip);
        (name, value)
    });
    let upstream_id = upstream.headers.get(X_REQUEST_ID);
    // Room for what goes in, and two more (the cache's verdict, the
    // framing Pingora adds): the map lives as long as the answer, a
    // stream's included, and its capacity doubles past each power of two.
    let count = forwarded.iter().filter(|(_, v)| v.is_some()).count()
        + usize::from(upstream_id.is_some())
        + rate_limit_header_count(&exchange.rate_limits)
        + GATEWAY_HEADERS;
    parts.headers.reserve(count + 2);
    for (name, value) in forwarded {
        if let Some(value) = value {
            parts.headers.insert(name, redacted(redactor, value)?);
        }
    }
    if let Some(id) = upstream_id {
        parts
            .headers
            .insert(X_UPSTREAM_REQUEST_ID, redacted(redactor, id)?);
    }
    gateway_headers(&mut parts.headers, exchange, provider, attempts)?;
    Ok(Box::new(ResponseHeader::from(parts)))
}

/// A provider's header value as the client may see it: a provider
/// echoing its key in a header gets it overwritten there too.
pub(super) fn redacted(
    redactor: &Redactor<'_>,
    value: &HeaderValue,
) -> Result<HeaderValue, http::header::InvalidHeaderValue> {
    match redactor.redact(value.as_bytes()) {
        std::borrow::Cow::Borrowed(_) => Ok(value.clone()),
        std::borrow::Cow::Owned(bytes) => HeaderValue::from_bytes(&bytes),
    }
}

/// How many headers [`gateway_headers`] adds besides the rate limits.
const GATEWAY_HEADERS: usize = 3;

/// The gateway's own headers on a proxied answer: the tenant's rate limits,
/// the request id, who served and after how many attempts.
pub(super) fn gateway_headers(
    headers: &mut HeaderMap,
    exchange: &Exchange<'_>,
    provider: &str,
    attempts: u32,
) -> Result<(), HeaderError> {
    // Every value is written into one buffer and split off it: one
    // allocation for them all instead of one each.
    let mut text = BytesMut::with_capacity(256);
    let value = |text: &mut BytesMut| HeaderValue::from_maybe_shared(text.split().freeze());
    each_rate_limit_value(&exchange.rate_limits, |name, number| {
        let _ = number.write_to(&mut text);
        headers.insert(name.clone(), value(&mut text)?);
        Ok::<(), HeaderError>(())
    })?;
    text.extend_from_slice(exchange.request_id.as_bytes());
    headers.insert(X_REQUEST_ID, value(&mut text)?);
    text.extend_from_slice(provider.as_bytes());
    headers.insert(X_RUNESTONE_PROVIDER, value(&mut text)?);
    let _ = write_number(&mut text, attempts.into());
    headers.insert(X_RUNESTONE_ATTEMPTS, value(&mut text)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::with_tail;

    #[test]
    fn a_tail_goes_before_the_query_and_queries_join() {
        assert_eq!(with_tail("/v1/responses".into(), "", None), "/v1/responses");
        assert_eq!(
            with_tail(
                "/v1/responses".into(),
                "/resp_1/input_items",
                Some("limit=2")
            ),
            "/v1/responses/resp_1/input_items?limit=2"
        );
        assert_eq!(
            with_tail(
                "/openai/responses?api-version=x".into(),
                "/resp_1",
                Some("include=a")
            ),
            "/openai/responses/resp_1?api-version=x&include=a"
        );
    }
}
