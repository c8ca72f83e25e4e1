//! The OpenAI wire format, as far as the gateway needs it.
//!
//! The gateway never deserialises a whole request: [`RequestFields::parse`]
//! borrows the handful of fields routing and accounting need, and
//! [`rewrite_body`] splices the provider's model name into the original bytes
//! instead of re-serialising them. [`ApiError`] is the one error type clients
//! see; it renders the `{"error": {...}}` body the official SDKs map to their
//! exception classes.

use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;

/// An error answered to the client in OpenAI's shape.
///
/// `status`, `kind` (the body's `type`) and `code` follow the table in
/// DESIGN.md so that the SDKs raise the same exception class as they would
/// against the provider; `reason` is the low-cardinality label used in
/// `runestone_errors_total`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status code.
    pub status: u16,
    /// The body's `error.type`.
    pub kind: &'static str,
    /// The body's `error.code`.
    pub code: &'static str,
    /// The body's `error.param`, when one request field is at fault.
    pub param: Option<Box<str>>,
    /// Human-readable message; never contains a key.
    pub message: Box<str>,
    /// Milliseconds the client should wait before retrying (`retry-after`
    /// and `retry-after-ms`).
    pub retry_after_ms: Option<u64>,
    /// Further response headers (`x-ratelimit-*` on a 429).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// A `runestone_errors_total` reason more precise than the code's.
    pub reason: Option<Reason>,
}

/// Reasons that the error code alone does not tell apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// A parked request waited for as long as the tenant allows.
    OverflowTimeout,
    /// A failed authentication, answered 429 because its address is past
    /// its failures.
    Auth,
}

impl Reason {
    fn label(self) -> &'static str {
        match self {
            Reason::OverflowTimeout => "policy_overflow_timeout",
            Reason::Auth => "auth",
        }
    }
}

impl ApiError {
    fn new(
        status: u16,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        ApiError {
            status,
            kind,
            code,
            param: None,
            message: message.into().into_boxed_str(),
            retry_after_ms: None,
            headers: Vec::new(),
            reason: None,
        }
    }

    fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into().into_boxed_str());
        self
    }

    /// 400: the body is not valid JSON (or not UTF-8).
    pub fn invalid_json(detail: impl fmt::Display) -> Self {
        Self::new(
            400,
            "invalid_request_error",
            "invalid_json",
            format!("We could not parse the JSON body of your request: {detail}"),
        )
    }

    /// 400: a field has the wrong type or value.
    pub fn invalid_field(param: &str, detail: impl fmt::Display) -> Self {
        Self::new(
            400,
            "invalid_request_error",
            "invalid_value",
            format!("Invalid value for '{param}': {detail}"),
        )
        .with_param(param)
    }

    /// 400: a request the gateway cannot interpret (framing, headers).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "invalid_request_error", "invalid_request", message)
    }

    /// 400: no `model` in the body.
    pub fn missing_model() -> Self {
        Self::new(
            400,
            "invalid_request_error",
            "missing_model",
            "You must provide a model parameter.",
        )
        .with_param("model")
    }

    /// 401: missing or unknown API key.
    pub fn invalid_api_key(detail: &str) -> Self {
        Self::new(
            401,
            "invalid_request_error",
            "invalid_api_key",
            format!("{detail} You can obtain an API key from your gateway operator."),
        )
    }

    /// 403: the model is outside the tenant's allow-list.
    pub fn model_not_allowed(model: &str) -> Self {
        Self::new(
            403,
            "permission_error",
            "model_not_allowed",
            format!("Your API key is not allowed to use the model '{model}'."),
        )
        .with_param("model")
    }

    /// 404: no route for the model.
    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            404,
            "invalid_request_error",
            "model_not_found",
            format!("The model '{model}' does not exist or you do not have access to it."),
        )
        .with_param("model")
    }

    /// 400: a job callback URL outside the tenant's allow-list.
    pub fn callback_not_allowed() -> Self {
        Self::new(
            400,
            "invalid_request_error",
            "callback_not_allowed",
            "The x-runestone-callback URL is not in your callback allow-list.",
        )
        .with_param("x-runestone-callback")
    }

    /// 404: no such job for this tenant.
    pub fn job_not_found(id: &str) -> Self {
        Self::new(
            404,
            "invalid_request_error",
            "job_not_found",
            format!("No job '{id}' was found for your API key."),
        )
    }

    /// 404: unknown path.
    pub fn unknown_url(method: &str, path: &str) -> Self {
        Self::new(
            404,
            "invalid_request_error",
            "unknown_url",
            format!("Invalid URL ({method} {path})"),
        )
    }

    /// 405: known path, wrong method.
    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            405,
            "invalid_request_error",
            "method_not_allowed",
            format!("Method {method} is not allowed for {path}"),
        )
    }

    /// 413: body over `server.max_request_body_bytes`.
    pub fn request_too_large(limit: usize) -> Self {
        Self::new(
            413,
            "invalid_request_error",
            "request_too_large",
            format!("The request body exceeds the gateway's limit of {limit} bytes."),
        )
    }

    /// 431: request line and headers over `server.max_request_header_bytes`.
    pub fn headers_too_large(limit: usize) -> Self {
        Self::new(
            431,
            "invalid_request_error",
            "request_header_fields_too_large",
            format!("The request's headers exceed the gateway's limit of {limit} bytes."),
        )
    }

    /// 429: a tenant's rate or concurrency limit.
    pub fn rate_limit_exceeded(message: impl Into<String>) -> Self {
        Self::new(429, "rate_limit_error", "rate_limit_exceeded", message)
    }

    /// 429: the tenant's budget for the period is spent.
    pub fn insufficient_quota(message: impl Into<String>) -> Self {
        Self::new(429, "insufficient_quota", "insufficient_quota", message)
    }

    /// 429: the provider itself is rate limiting and no other target could
    /// serve.
    pub fn provider_rate_limited(provider: &str) -> Self {
        Self::new(
            429,
            "rate_limit_error",
            "upstream_rate_limited",
            format!("The provider '{provider}' is rate limiting the gateway and no other provider could serve."),
        )
    }

    /// 502: the provider failed and nothing else could serve.
    pub fn upstream_error(message: impl Into<String>) -> Self {
        Self::new(502, "api_error", "upstream_error", message)
    }

    /// 503: the in-process async job store is at its bound.
    pub fn job_store_full() -> Self {
        Self::new(
            503,
            "api_error",
            "job_store_full",
            "The gateway's async job store is full; retry after the time given.",
        )
    }

    /// 503 (a job's stored result): its answer did not fit the in-process
    /// job store.
    pub fn job_store_full_for_answer(bytes: usize) -> Self {
        Self::new(
            503,
            "api_error",
            "job_store_full",
            format!("The answer ({bytes} bytes) did not fit the gateway's in-process job store; raise jobs.in_process_max_bytes or configure Redis."),
        )
    }

    /// 503: no target of the model can be tried right now.
    pub fn no_healthy_upstream(model: &str) -> Self {
        Self::new(
            503,
            "api_error",
            "no_healthy_upstream",
            format!("No provider for the model '{model}' can serve the request right now."),
        )
    }

    /// 504: the provider was too slow.
    pub fn upstream_timeout(message: impl Into<String>) -> Self {
        Self::new(504, "api_error", "upstream_timeout", message)
    }

    /// 500: a fault inside the gateway.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "api_error", "gateway_internal", message)
    }

    /// The `runestone_errors_total{reason}` label for this error.
    pub fn reason(&self) -> &'static str {
        if let Some(reason) = self.reason {
            return reason.label();
        }
        match self.code {
            "invalid_api_key" => "auth",
            "rate_limit_exceeded" | "job_store_full" => "policy_rate_limited",
            "upstream_rate_limited" => "provider_429",
            "insufficient_quota" => "policy_budget",
            "upstream_error" => "provider_5xx",
            "upstream_timeout" => "provider_timeout",
            "no_healthy_upstream" => "no_healthy_upstream",
            "gateway_internal" => "gateway_internal",
            _ => "invalid_request",
        }
    }

    /// The JSON body: `{"error": {"message", "type", "param", "code"}}`.
    pub fn body(&self) -> Bytes {
        let body = serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        });
        Bytes::from(body.to_string())
    }

    /// The same error as one SSE event, for a stream that breaks after
    /// bytes reached the client (no `[DONE]` follows, so SDKs raise).
    pub fn sse_event(&self) -> Bytes {
        let mut event = Vec::with_capacity(128);
        event.extend_from_slice(b"data: ");
        event.extend_from_slice(&self.body());
        event.extend_from_slice(b"\n\n");
        Bytes::from(event)
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.status, self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

/// The OpenAI endpoints the gateway proxies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`
    ChatCompletions,
    /// `POST /v1/completions`
    Completions,
    /// `POST /v1/embeddings`
    Embeddings,
}

impl Endpoint {
    /// The endpoint for a gateway path, if it is one the gateway proxies.
    pub fn from_path(path: &str) -> Option<Self> {
        match path {
            "/v1/chat/completions" => Some(Endpoint::ChatCompletions),
            "/v1/completions" => Some(Endpoint::Completions),
            "/v1/embeddings" => Some(Endpoint::Embeddings),
            _ => None,
        }
    }

    /// The path relative to a provider's OpenAI base URL (`.../v1`).
    pub fn provider_suffix(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/chat/completions",
            Endpoint::Completions => "/completions",
            Endpoint::Embeddings => "/embeddings",
        }
    }

    /// A short label for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
        }
    }
}

/// `stream_options` as sent by the client.
#[derive(Debug, Default, Deserialize, Clone, Copy, PartialEq)]
pub struct StreamOptions {
    /// Whether the client asked for a final usage chunk.
    #[serde(default)]
    pub include_usage: Option<bool>,
}

#[derive(Deserialize)]
struct RawFields<'a> {
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(borrow, default, deserialize_with = "present")]
    stream_options: Option<&'a RawValue>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(borrow, default, deserialize_with = "present")]
    api_key: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    api_base: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    base_url: Option<&'a RawValue>,
    #[serde(borrow, default)]
    messages: Option<&'a RawValue>,
}

/// A member that is there, even as `null` (a plain `Option` reads `null` as
/// absent, and its span would be lost).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// The request fields the gateway reads, borrowed from the body.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestFields<'a> {
    /// The public model name asked for.
    pub model: Cow<'a, str>,
    /// Byte range of the `model` value (with its quotes) in the body.
    pub model_span: (usize, usize),
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// The client's `stream_options`, if any.
    pub stream_options: Option<StreamOptions>,
    /// Byte range of the `stream_options` value in the body.
    pub stream_options_span: Option<(usize, usize)>,
    /// `max_completion_tokens`, or else `max_tokens`.
    pub max_tokens: Option<u64>,
    /// The body carries fields that name another upstream or key
    /// (`api_key`, `api_base`, `base_url`): they are removed before
    /// forwarding and never honoured.
    pub has_foreign_upstream_fields: bool,
    /// `messages`, when present, is a JSON array (its items are the
    /// provider's to check).
    pub messages_is_array: Option<bool>,
}

impl<'a> RequestFields<'a> {
    /// The error for a body the plain parse refused, naming the field at
    /// fault: the parse is repeated with the path tracked.
    fn field_error(text: &str) -> ApiError {
        let mut deserializer = serde_json::Deserializer::from_str(text);
        let parsed = serde_path_to_error::deserialize::<_, RawFields<'_>>(&mut deserializer)
            .map(drop)
            .map_err(|e| {
                let path = e.path().to_string();
                let inner = e.into_inner();
                match inner.classify() {
                    serde_json::error::Category::Data if path != "." => {
                        ApiError::invalid_field(&path, inner)
                    }
                    serde_json::error::Category::Data => ApiError::bad_request(format!(
                        "The request body must be a JSON object: {inner}"
                    )),
                    _ => ApiError::invalid_json(inner),
                }
            });
        match parsed.and_then(|()| deserializer.end().map_err(ApiError::invalid_json)) {
            Err(error) => error,
            // Both parses read the same text the same way.
            Ok(()) => ApiError::invalid_json("the body is not valid JSON"),
        }
    }

    /// Reads the fields from a JSON body, without copying the rest.
    pub fn parse(body: &'a [u8]) -> Result<Self, ApiError> {
        // JSON is UTF-8, and the parser skips the strings it does not read
        // without checking them: check the whole body, so nothing invalid
        // is passed on to a provider.
        let text = std::str::from_utf8(body).map_err(|e| {
            ApiError::invalid_json(format!(
                "the body is not valid UTF-8 (at byte {})",
                e.valid_up_to()
            ))
        })?;
        if body.trim_ascii_start().first() != Some(&b'{') {
            return Err(
                match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
                    Ok(_) => ApiError::bad_request("The request body must be a JSON object."),
                    Err(e) => ApiError::invalid_json(e),
                },
            );
        }
        // The plain parse is the fast path; only a failed one is parsed
        // again, tracking the path, to name the offending field.
        let raw: RawFields<'a> = match serde_json::from_str(text) {
            Ok(raw) => raw,
            Err(_) => return Err(Self::field_error(text)),
        };
        check_json_limits(body)?;
        let model_raw = raw.model.ok_or_else(ApiError::missing_model)?;
        let model: Cow<'a, str> = match serde_json::from_str::<Cow<'a, str>>(model_raw.get()) {
            Ok(model) => model,
            Err(_) if model_raw.get() == "null" => return Err(ApiError::missing_model()),
            Err(_) => return Err(ApiError::invalid_field("model", "expected a string")),
        };
        if model.trim().is_empty() {
            return Err(ApiError::missing_model());
        }
        let span = |raw: &RawValue| {
            let start = raw.get().as_ptr() as usize - body.as_ptr() as usize;
            (start, start + raw.get().len())
        };
        let stream_options = match raw.stream_options {
            Some(raw) if raw.get() != "null" => Some(
                serde_json::from_str::<StreamOptions>(raw.get())
                    .map_err(|e| ApiError::invalid_field("stream_options", e))?,
            ),
            _ => None,
        };
        Ok(RequestFields {
            model,
            model_span: span(model_raw),
            stream: raw.stream.unwrap_or(false),
            stream_options,
            stream_options_span: raw.stream_options.map(span),
            max_tokens: raw.max_completion_tokens.or(raw.max_tokens),
            has_foreign_upstream_fields: raw.api_key.is_some()
                || raw.api_base.is_some()
                || raw.base_url.is_some(),
            messages_is_array: raw.messages.map(|m| m.get().starts_with('[')),
        })
    }
}

impl RequestFields<'_> {
    /// Whether the client asked for a final usage chunk in its stream.
    pub fn client_wants_usage(&self) -> bool {
        self.stream_options.and_then(|o| o.include_usage) == Some(true)
    }
}

/// Deepest nesting of arrays and objects accepted in a request body.
pub const MAX_JSON_DEPTH: usize = 128;

/// Refuses a body (already known to be valid JSON) that nests deeper than
/// [`MAX_JSON_DEPTH`] or holds a number outside the range of an `f64`: no
/// JSON library on either side could represent it, and the gateway answers
/// it at once rather than let a provider or a re-serialisation choke on it.
/// One pass over the bytes; strings are skipped with `memchr`.
fn check_json_limits(body: &[u8]) -> Result<(), ApiError> {
    let mut depth = 0usize;
    let mut i = 0;
    while i < body.len() {
        match body[i] {
            b'"' => {
                i += 1;
                // Skip to the closing quote, stepping over escapes.
                while let Some(at) = memchr::memchr2(b'"', b'\\', &body[i..]) {
                    i += at + 1;
                    if body[i - 1] == b'"' {
                        break;
                    }
                    i += 1;
                }
                continue;
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_JSON_DEPTH {
                    return Err(ApiError::invalid_json(format!(
                        "arrays and objects nest deeper than {MAX_JSON_DEPTH} levels"
                    )));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < body.len()
                    && matches!(body[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
                {
                    i += 1;
                }
                let number = &body[start..i];
                // Only an exponent or a very long literal can overflow.
                let may_overflow =
                    number.len() > 300 || number.iter().any(|&b| b == b'e' || b == b'E');
                if may_overflow {
                    let finite = std::str::from_utf8(number)
                        .ok()
                        .and_then(|n| n.parse::<f64>().ok())
                        .is_some_and(f64::is_finite);
                    if !finite {
                        return Err(ApiError::invalid_json(format!(
                            "the number {} is out of range",
                            String::from_utf8_lossy(&number[..number.len().min(32)])
                        )));
                    }
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// Body fields that name another upstream or key: removed, never honoured.
const FOREIGN_UPSTREAM_FIELDS: [&str; 3] = ["api_key", "api_base", "base_url"];

/// Produces the body sent upstream: the provider's model name in place of
/// the public one, `stream_options.include_usage` set when `ask_usage`, and
/// any `api_key`/`api_base`/`base_url` removed. Edits are spliced into the
/// original bytes; the body is returned untouched (no copy) when nothing
/// has to change.
pub fn rewrite_body(
    body: &Bytes,
    fields: &RequestFields<'_>,
    provider_model: &str,
    ask_usage: bool,
) -> Bytes {
    if fields.has_foreign_upstream_fields {
        // The rare path: take the members out of the bytes, then edit the
        // result like any other body. Both steps keep every other byte.
        let cleaned = without_members(body, &FOREIGN_UPSTREAM_FIELDS);
        if let Ok(fields) = RequestFields::parse(&cleaned) {
            if !fields.has_foreign_upstream_fields {
                return splice_edits(&cleaned, &fields, provider_model, ask_usage);
            }
        }
        // Unreachable for a body `fields` was parsed from; never forward
        // the fields even so.
        return Bytes::from_static(b"{}");
    }
    splice_edits(body, fields, provider_model, ask_usage)
}

/// The model and usage edits of [`rewrite_body`], spliced into `body`.
fn splice_edits(
    body: &Bytes,
    fields: &RequestFields<'_>,
    provider_model: &str,
    ask_usage: bool,
) -> Bytes {
    let mut edits: Vec<(usize, usize, Vec<u8>)> = Vec::with_capacity(2);
    if fields.model != provider_model {
        let quoted = serde_json::to_vec(provider_model).expect("a string always serialises");
        edits.push((fields.model_span.0, fields.model_span.1, quoted));
    }
    if ask_usage {
        match fields.stream_options_span {
            Some((start, end)) => edits.push(include_usage_edit(body, start, end)),
            None => {
                // The body is a JSON object (parse checked): it opens with `{`.
                let open = body.iter().position(|&b| b == b'{').unwrap_or(0);
                edits.push((
                    open + 1,
                    open + 1,
                    br#""stream_options":{"include_usage":true},"#.to_vec(),
                ));
            }
        }
    }
    if edits.is_empty() {
        return body.clone();
    }
    edits.sort_by_key(|e| e.0);
    let grown: usize = edits
        .iter()
        .map(|(s, e, v)| v.len() - (e - s).min(v.len()))
        .sum();
    let mut out = Vec::with_capacity(body.len() + grown);
    let mut at = 0;
    for (start, end, value) in edits {
        out.extend_from_slice(&body[at..start]);
        out.extend_from_slice(&value);
        at = end;
    }
    out.extend_from_slice(&body[at..]);
    Bytes::from(out)
}

/// An async job runs without a client to stream to: the body with `stream`
/// and `stream_options` taken out, every other byte as sent.
pub fn without_streaming(body: &Bytes) -> Bytes {
    without_members(body, &["stream", "stream_options"])
}

/// The top-level members of a JSON object body, each as its name and the
/// byte range from its key's opening quote to the end of its value.
struct Members<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut members = Vec::new();
                while let Some(entry) = map.next_entry::<Cow<'de, str>, &'de RawValue>()? {
                    members.push(entry);
                }
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(Visit)
    }
}

/// A top-level member's place in the bytes: its name, where its key's
/// opening quote is, and where its value starts and ends.
struct Span<'a> {
    name: Cow<'a, str>,
    key_start: usize,
    value_start: usize,
    value_end: usize,
}

/// The members of a JSON object `text` (a slice of `body` starting at
/// `offset`), with their places in `body`. `None` when it is not an object.
fn spans<'a>(body: &'a [u8], offset: usize, text: &'a str) -> Option<Vec<Span<'a>>> {
    let Members(members) = serde_json::from_str::<Members<'_>>(text).ok()?;
    let base = body.as_ptr() as usize;
    members
        .into_iter()
        .map(|(name, value)| {
            let value_start = value.get().as_ptr() as usize - base;
            Some(Span {
                name,
                key_start: key_start(body, value_start).filter(|&k| k >= offset)?,
                value_start,
                value_end: value_start + value.get().len(),
            })
        })
        .collect()
}

/// `body` (a JSON object) without its top-level members named in `names`:
/// each run of removed members is cut out with one separator, so every
/// other byte (order, spacing, escapes) stays as sent. A body that is not a
/// JSON object is returned as it is.
fn without_members(body: &Bytes, names: &[&str]) -> Bytes {
    let Ok(text) = std::str::from_utf8(body) else {
        return body.clone();
    };
    let Some(members) = spans(body, 0, text) else {
        return body.clone();
    };
    let removed = |i: usize| names.contains(&members[i].name.as_ref());
    if !(0..members.len()).any(removed) {
        return body.clone();
    }
    let mut cuts: Vec<(usize, usize)> = Vec::new();
    let mut i = 0;
    while i < members.len() {
        if !removed(i) {
            i += 1;
            continue;
        }
        let first = i;
        while i < members.len() && removed(i) {
            i += 1;
        }
        let last = i - 1;
        cuts.push(if i < members.len() {
            // Up to the next kept member's key, separator included.
            (members[first].key_start, members[i].key_start)
        } else if first > 0 {
            // From the end of the last kept member's value.
            (members[first - 1].value_end, members[last].value_end)
        } else {
            (members[first].key_start, members[last].value_end)
        });
    }
    let mut out = Vec::with_capacity(body.len());
    let mut at = 0;
    for (start, end) in cuts {
        out.extend_from_slice(&body[at..start]);
        at = end;
    }
    out.extend_from_slice(&body[at..]);
    Bytes::from(out)
}

/// The edit that sets `include_usage: true` in the `stream_options` value
/// at `start..end`, spliced so the client's other options keep their bytes.
fn include_usage_edit(body: &[u8], start: usize, end: usize) -> (usize, usize, Vec<u8>) {
    let whole = (start, end, br#"{"include_usage":true}"#.to_vec());
    let Some(members) = std::str::from_utf8(&body[start..end])
        .ok()
        .and_then(|text| spans(body, start, text))
    else {
        return whole;
    };
    if let Some(existing) = members.iter().find(|m| m.name == "include_usage") {
        return (existing.value_start, existing.value_end, b"true".to_vec());
    }
    match members.first() {
        Some(first) => (
            first.key_start,
            first.key_start,
            br#""include_usage":true,"#.to_vec(),
        ),
        None => whole,
    }
}

/// The opening quote of the key whose value starts at `value_start`: back
/// over whitespace, the `:`, whitespace, the key's closing quote, then to
/// the first quote that is not escaped.
fn key_start(body: &[u8], value_start: usize) -> Option<usize> {
    let mut i = value_start;
    let back_over_space = |i: &mut usize| {
        while *i > 0 && body[*i - 1].is_ascii_whitespace() {
            *i -= 1;
        }
    };
    back_over_space(&mut i);
    i = i.checked_sub(1).filter(|&c| body[c] == b':')?;
    back_over_space(&mut i);
    i = i.checked_sub(1).filter(|&c| body[c] == b'"')?;
    loop {
        i = i.checked_sub(1)?;
        if body[i] == b'"' {
            let backslashes = body[..i].iter().rev().take_while(|&&b| b == b'\\').count();
            if backslashes % 2 == 0 {
                return Some(i);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_model_after_messages() {
        let body =
            br#"{"messages":[{"role":"user","content":"hi"}],"model":"gpt-4o-mini","stream":true}"#;
        let fields = RequestFields::parse(body).unwrap();
        assert_eq!(fields.model, "gpt-4o-mini");
        assert!(fields.stream);
        assert_eq!(
            &body[fields.model_span.0..fields.model_span.1],
            b"\"gpt-4o-mini\""
        );
    }

    #[test]
    fn reads_escaped_model_names() {
        let body = br#"{"model":"a\u0062c"}"#;
        assert_eq!(RequestFields::parse(body).unwrap().model, "abc");
    }

    #[test]
    fn rejects_bodies_that_are_not_json() {
        for body in [
            &b"{"[..],
            b"not json",
            b"\xff\xfe",
            b"{\"model\": \"\xff\"}",
        ] {
            let err = RequestFields::parse(body).unwrap_err();
            assert_eq!((err.status, err.code), (400, "invalid_json"), "{body:?}");
        }
    }

    #[test]
    fn rejects_missing_empty_or_null_model() {
        for body in [
            &br#"{}"#[..],
            br#"{"model":""}"#,
            br#"{"model":null}"#,
            br#"{"model":"  "}"#,
        ] {
            let err = RequestFields::parse(body).unwrap_err();
            assert_eq!(
                err.code,
                "missing_model",
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn rejects_wrongly_typed_fields() {
        let err = RequestFields::parse(br#"{"model":5}"#).unwrap_err();
        assert_eq!((err.status, err.param.as_deref()), (400, Some("model")));
        let err = RequestFields::parse(br#"{"model":"m","stream":"yes"}"#).unwrap_err();
        assert_eq!((err.status, err.param.as_deref()), (400, Some("stream")));
        let err = RequestFields::parse(br#"{"model":"m","max_tokens":-1}"#).unwrap_err();
        assert_eq!(
            (err.status, err.param.as_deref()),
            (400, Some("max_tokens"))
        );
        let err = RequestFields::parse(br#"[1,2]"#).unwrap_err();
        assert_eq!(err.status, 400);
    }

    #[test]
    fn rewrite_keeps_the_body_when_the_model_name_is_the_same() {
        let body = Bytes::from_static(br#"{"model":"m","messages":[]}"#);
        let fields = RequestFields::parse(&body).unwrap();
        let out = rewrite_body(&body, &fields, "m", false);
        assert_eq!(out.as_ptr(), body.as_ptr(), "no copy expected");
    }

    #[test]
    fn rewrite_splices_the_provider_model_name() {
        let body =
            Bytes::from_static(br#"{"messages":[{"content":"model"}], "model" : "public","n":1}"#);
        let fields = RequestFields::parse(&body).unwrap();
        let out = rewrite_body(&body, &fields, "provider-\"x\"", false);
        let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(value["model"], "provider-\"x\"");
        assert_eq!(value["messages"][0]["content"], "model");
        assert_eq!(value["n"], 1);
    }

    #[test]
    fn rewrite_removes_fields_that_name_another_upstream() {
        let body = Bytes::from_static(
            br#"{"model":"m","api_key":"sk-x","api_base":"http://evil","base_url":"http://evil"}"#,
        );
        let fields = RequestFields::parse(&body).unwrap();
        assert!(fields.has_foreign_upstream_fields);
        let value: serde_json::Value =
            serde_json::from_slice(&rewrite_body(&body, &fields, "p", false)).unwrap();
        assert_eq!(value, serde_json::json!({"model": "p"}));
    }

    #[test]
    fn removing_foreign_fields_keeps_every_other_byte() {
        // Key order, spacing, escapes and a big integer stay as sent.
        let body = Bytes::from_static(
            br#"{ "z": 12345678901234567890123, "api_key" : "sk-\"x\"", "a\u0062": [1.50, {"k":"v"}], "base_url":null,"api_\u0062ase":"e", "model":"m"}"#,
        );
        let fields = RequestFields::parse(&body).unwrap();
        let out = rewrite_body(&body, &fields, "m", false);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{ "z": 12345678901234567890123, "a\u0062": [1.50, {"k":"v"}], "model":"m"}"#
        );
        let out = rewrite_body(&body, &fields, "p", true);
        let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(value["model"], "p");
        assert_eq!(value["stream_options"]["include_usage"], true);
        assert!(value.get("api_key").is_none() && value.get("api_base").is_none());
    }

    #[test]
    fn asking_for_usage_keeps_the_clients_other_options_as_sent() {
        let body = Bytes::from_static(
            br#"{"model":"m","stream":true,"stream_options":{"include_usage":false, "z":12345678901234567890123,"s":"\u00e9"}}"#,
        );
        let fields = RequestFields::parse(&body).unwrap();
        let out = rewrite_body(&body, &fields, "m", true);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"model":"m","stream":true,"stream_options":{"include_usage":true, "z":12345678901234567890123,"s":"\u00e9"}}"#
        );
        for (options, expected) in [
            (r#"{"x":1}"#, r#"{"include_usage":true,"x":1}"#),
            (r#"{ }"#, r#"{"include_usage":true}"#),
            ("null", r#"{"include_usage":true}"#),
        ] {
            let body = Bytes::from(format!(r#"{{"model":"m","stream_options":{options}}}"#));
            let fields = RequestFields::parse(&body).unwrap();
            let out = rewrite_body(&body, &fields, "m", true);
            assert_eq!(
                std::str::from_utf8(&out).unwrap(),
                format!(r#"{{"model":"m","stream_options":{expected}}}"#)
            );
        }
    }

    #[test]
    fn removing_members_leaves_valid_json_wherever_they_are() {
        for (body, expected) in [
            (r#"{"api_key":1, "model":"m"}"#, r#"{"model":"m"}"#),
            (
                r#"{"model":"m", "api_key":1 , "base_url":2 }"#,
                r#"{"model":"m" }"#,
            ),
            (
                r#"{"model":"m","api_key":1,"n":2,"base_url":3}"#,
                r#"{"model":"m","n":2}"#,
            ),
        ] {
            let body = Bytes::from(body);
            assert_eq!(
                std::str::from_utf8(&without_members(&body, &FOREIGN_UPSTREAM_FIELDS)).unwrap(),
                expected
            );
        }
    }

    #[test]
    fn refuses_numbers_out_of_range_and_deep_nesting() {
        for body in [
            r#"{"model":"m","api_key":"k","temperature":1e999}"#.to_string(),
            r#"{"model":"m","x":-1E400}"#.to_string(),
            format!(r#"{{"model":"m","x":{}}}"#, "9".repeat(400)),
            format!(
                r#"{{"model":"m","messages":{}1{}}}"#,
                "[".repeat(200),
                "]".repeat(200)
            ),
        ] {
            let err = RequestFields::parse(body.as_bytes()).unwrap_err();
            assert_eq!((err.status, err.code), (400, "invalid_json"), "{body}");
        }
        let ok = format!(
            r#"{{"model":"m","x":[1e300,-2.5E-10,"1e999 \" {{[",{}0{}]}}"#,
            "[".repeat(MAX_JSON_DEPTH - 2),
            "]".repeat(MAX_JSON_DEPTH - 2)
        );
        assert!(RequestFields::parse(ok.as_bytes()).is_ok(), "{ok}");
    }

    #[test]
    fn jobs_run_without_streaming_fields_and_nothing_else_changes() {
        let body = Bytes::from_static(
            br#"{"stream":true,"model":"m","n":12345678901234567890,"stream_options":{"include_usage":true}}"#,
        );
        assert_eq!(
            &without_streaming(&body)[..],
            br#"{"model":"m","n":12345678901234567890}"#
        );
        let plain = Bytes::from_static(br#"{"model":"m"}"#);
        assert_eq!(without_streaming(&plain).as_ptr(), plain.as_ptr());
    }

    #[test]
    fn rewrite_asks_for_usage_without_touching_the_rest() {
        let body = Bytes::from_static(br#"{"model":"m","stream":true,"messages":[]}"#);
        let fields = RequestFields::parse(&body).unwrap();
        assert!(!fields.client_wants_usage());
        let out = rewrite_body(&body, &fields, "p", true);
        let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"model": "p", "stream": true, "messages": [], "stream_options": {"include_usage": true}})
        );

        let body = Bytes::from_static(
            br#"{"stream_options":{"include_usage":false,"x":1},"model":"m","stream":true}"#,
        );
        let fields = RequestFields::parse(&body).unwrap();
        let out = rewrite_body(&body, &fields, "m", true);
        let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            value["stream_options"],
            serde_json::json!({"include_usage": true, "x": 1})
        );

        let body = Bytes::from_static(
            br#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#,
        );
        assert!(RequestFields::parse(&body).unwrap().client_wants_usage());
        let err =
            RequestFields::parse(br#"{"model":"m","stream_options":{"include_usage":"yes"}}"#)
                .unwrap_err();
        assert_eq!(err.param.as_deref(), Some("stream_options"));
    }

    #[test]
    fn error_body_has_the_openai_shape() {
        let body: serde_json::Value =
            serde_json::from_slice(&ApiError::missing_model().body()).unwrap();
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["code"], "missing_model");
        assert_eq!(body["error"]["param"], "model");
        assert!(body["error"]["message"].is_string());
    }
}
