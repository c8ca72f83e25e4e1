//! [`ApiError`]: the one error type clients see, rendering the
//! `{"error": {...}}` body the official SDKs map to their exception classes.

use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use std::fmt;

/// An error answered to the client in OpenAI's shape.
///
/// `status`, `kind` (the body's `type`) and `code` follow the table in
/// README's error table so that the SDKs raise the same exception class as they would
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
    /// The provider's own `error.code` of an error it put under a 200,
    /// sent in the body in place of `code` (its other errors reach the
    /// client as it wrote them). Never a metric label: `code` is. A thin
    /// pointer (boxed twice): every `Result` of the gateway carries an
    /// `ApiError`, and one this rare should not make them all larger.
    pub provider_code: Option<Box<String>>,
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
            provider_code: None,
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

    /// 400: the prompt (with the answer asked for) does not fit the model's
    /// context window, as OpenAI says it.
    pub fn context_length_exceeded(message: impl Into<String>) -> Self {
        Self::new(
            400,
            "invalid_request_error",
            "context_length_exceeded",
            message,
        )
        .with_param("messages")
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

    /// 409: the submission's idempotency key names a job submitted with
    /// another request.
    pub fn idempotency_key_reused() -> Self {
        Self::new(
            409,
            "invalid_request_error",
            "idempotency_key_reused",
            "This idempotency key was used for another request; send the same request with it, or use another key.",
        )
        .with_param("idempotency-key")
    }

    /// 409 (a job's stored answer): the job was cancelled by its tenant.
    pub fn job_cancelled() -> Self {
        Self::new(
            409,
            "invalid_request_error",
            "job_cancelled",
            "The job was cancelled.",
        )
    }

    /// 504 (a job's attempt): it ran past `jobs.timeout_seconds`.
    pub fn job_timeout(limit: std::time::Duration) -> Self {
        Self::new(
            504,
            "api_error",
            "job_timeout",
            format!(
                "The job's attempt ran past its time limit of {} s and was cancelled.",
                limit.as_secs()
            ),
        )
    }

    /// 504 (a job's answer): it could not start within `jobs.max_age_seconds`.
    pub fn job_expired(max_age: std::time::Duration) -> Self {
        Self::new(
            504,
            "api_error",
            "job_expired",
            format!(
                "The job could not run within {} s of its submission.",
                max_age.as_secs()
            ),
        )
    }

    /// 404: no stored response `id` for this tenant (`param` names the
    /// field that gave it, for a follow-up).
    pub fn response_not_found(id: &str, param: Option<&str>) -> Self {
        let error = Self::new(
            404,
            "invalid_request_error",
            "response_not_found",
            format!("Response with id '{id}' not found."),
        );
        match param {
            Some(param) => error.with_param(param),
            None => error,
        }
    }

    /// 503: whether a stored response is the tenant's cannot be told now
    /// (Redis, which records it, does not answer).
    pub fn response_store_unavailable() -> Self {
        Self::unavailable_for_a_second(
            "response_store_unavailable",
            "The gateway cannot look up stored responses right now; retry shortly.",
        )
    }

    /// A 503 `api_error` whose retry is worth it after a second.
    fn unavailable_for_a_second(code: &'static str, message: &str) -> Self {
        let mut error = Self::new(503, "api_error", code, message);
        error.retry_after_ms = Some(1000);
        error
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

    /// 404: one of OpenAI's paths that this gateway does not serve;
    /// `what` says what the path does, for the message.
    pub fn not_served(method: &str, path: &str, what: &str) -> Self {
        let mut error = Self::unknown_url(method, path);
        error.message = format!("{}: {what} is not served by this gateway", error.message).into();
        error
    }

    /// 405: known path, wrong method; `allow` lists the path's methods
    /// (the `Allow` header).
    pub fn method_not_allowed(method: &str, path: &str, allow: &'static str) -> Self {
        let mut error = Self::new(
            405,
            "invalid_request_error",
            "method_not_allowed",
            format!("Method {method} is not allowed for {path}"),
        );
        error
            .headers
            .push((http::header::ALLOW, HeaderValue::from_static(allow)));
        error
    }

    /// 405: a WebSocket handshake (`Upgrade: websocket`) on a path that
    /// takes `allow`'s methods, such as the OpenAI SDKs' WebSocket mode
    /// of the Responses API: the gateway answers HTTP requests only.
    pub fn websocket_not_served(method: &str, path: &str, allow: &'static str) -> Self {
        let mut error = Self::method_not_allowed(method, path, allow);
        error.message = format!(
            "{}: WebSocket connections are not served by this gateway; send {allow} {path} (with stream: true for its events)",
            error.message
        )
        .into();
        error
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

    /// The provider's own error answer that is not OpenAI's shape (an empty
    /// body, plain text, HTML): its status kept, what text it gave (trimmed
    /// to a printable line) as the message.
    pub fn from_provider_answer(provider: &str, status: u16, body: &[u8]) -> Self {
        let text: String = String::from_utf8_lossy(body)
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect::<String>()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        let text: String = text.chars().take(300).collect();
        let message = if text.is_empty() {
            format!("The provider '{provider}' answered {status} with no message.")
        } else {
            format!("The provider '{provider}' answered {status}: {text}")
        };
        let kind = match status {
            401 | 403 => "authentication_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            400..=499 => "invalid_request_error",
            _ => "api_error",
        };
        Self::new(status, kind, "upstream_error", message)
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

    /// 503: the request was parked on an instance that is stopping
    /// (shutdown or upgrade); another instance, or the new process, takes
    /// it when retried.
    pub fn gateway_stopping() -> Self {
        Self::unavailable_for_a_second(
            "gateway_stopping",
            "The gateway is stopping and did not admit the request from its overflow queue; retry.",
        )
    }

    /// 503 `gateway_stopping`, told in-band to a client whose answer the
    /// gateway ended as its grace period ran out (shutdown or upgrade).
    pub fn stopped_mid_answer() -> Self {
        Self::unavailable_for_a_second(
            "gateway_stopping",
            "The gateway stopped before this answer was whole (its grace period ran out); retry.",
        )
    }

    /// 503 `gateway_stopping`, to a client still sending its request's body
    /// when the gateway's grace period ran out (shutdown or upgrade).
    pub fn stopped_reading_request() -> Self {
        Self::unavailable_for_a_second(
            "gateway_stopping",
            "The gateway stopped before the request's body arrived whole (its grace period ran out); retry.",
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
            "upstream_timeout" | "job_timeout" => "provider_timeout",
            "job_expired" => "policy_job_expired",
            "job_cancelled" => "cancelled",
            "no_healthy_upstream" => "no_healthy_upstream",
            "response_store_unavailable" => "store_unavailable",
            "gateway_internal" => "gateway_internal",
            "gateway_stopping" => "gateway_stopping",
            _ => "invalid_request",
        }
    }

    /// The body's `error.code`: the provider's own when it gave one.
    pub fn said_code(&self) -> &str {
        self.provider_code
            .as_deref()
            .map_or(self.code, String::as_str)
    }

    /// The JSON body: `{"error": {"message", "type", "param", "code"}}`.
    pub fn body(&self) -> Bytes {
        let body = serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.said_code(),
            }
        });
        Bytes::from(body.to_string())
    }

    /// The error event that ends a broken stream of `endpoint`: the
    /// Responses API's typed `error` event (numbered `sequence_number`, one
    /// past the last event the client got), else [`ApiError::sse_event`].
    pub fn sse_event_for(&self, endpoint: super::Endpoint, sequence_number: u64) -> Bytes {
        if endpoint == super::Endpoint::Responses {
            self.responses_sse_event(sequence_number)
        } else {
            self.sse_event()
        }
    }

    /// The same error as a Responses API `error` event, for a Responses
    /// stream that breaks after bytes reached the client.
    fn responses_sse_event(&self, sequence_number: u64) -> Bytes {
        let event = serde_json::json!({
            "type": "error",
            "code": self.said_code(),
            "message": self.message,
            "param": self.param,
            "sequence_number": sequence_number,
        });
        Bytes::from(format!("event: error\ndata: {event}\n\n"))
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

/// Whether a body is an OpenAI-shaped error: `{"error": {"message": ...}}`.
pub fn is_openai_error(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Body<'a> {
        #[serde(borrow)]
        error: Inner<'a>,
    }
    #[derive(serde::Deserialize)]
    struct Inner<'a> {
        #[serde(borrow)]
        message: std::borrow::Cow<'a, str>,
    }
    serde_json::from_slice::<Body<'_>>(body).is_ok_and(|b| !b.error.message.is_empty())
}

/// Whether an OpenAI-shaped error body says the prompt does not fit the
/// model's context window (`error.code` `context_length_exceeded`).
pub fn is_context_length_error(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Body<'a> {
        #[serde(borrow)]
        error: Inner<'a>,
    }
    #[derive(serde::Deserialize)]
    struct Inner<'a> {
        /// Raw: some servers put the HTTP status (a number) here.
        #[serde(default, borrow)]
        code: Option<&'a serde_json::value::RawValue>,
        #[serde(default, borrow)]
        message: Option<std::borrow::Cow<'a, str>>,
    }
    let Ok(Body { error }) = serde_json::from_slice::<Body<'_>>(body) else {
        return false;
    };
    // OpenAI sets the code; OpenAI-compatible servers (vLLM and others)
    // often only say it: "This model's maximum context length is 8192
    // tokens. However, you requested 9000 tokens".
    error
        .code
        .is_some_and(|code| code.get() == "\"context_length_exceeded\"")
        || error
            .message
            .is_some_and(|m| m.contains("maximum context length"))
}

/// Whether an event's `error` member makes it an error event: whether it
/// is not empty, as the OpenAI Python SDK reads it (it raises at such an
/// event); `null`, `false`, `0`, `""`, `{}` and `[]` are not (some servers
/// put one in every chunk).
pub fn error_says(error: &serde_json::Value) -> bool {
    use serde_json::Value;
    match error {
        Value::Null => false,
        Value::Bool(said) => *said,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(message) => !message.is_empty(),
        Value::Array(items) => !items.is_empty(),
        Value::Object(members) => !members.is_empty(),
    }
}

/// The provider's error in a JSON answer that came with a 200, as the
/// gateway's error ([`ApiError::from_in_band`]): a body that is an error
/// object (OpenAI's and OpenRouter's `{"error": {...}}`, TGI's
/// `{"error": "..."}`, vLLM's `{"object": "error", ...}`) and not an answer
/// (which has an `id`, as a failed Responses object read back does).
pub fn error_in_json_answer(body: &[u8]) -> Option<ApiError> {
    use serde_json::value::RawValue;
    #[derive(serde::Deserialize)]
    struct Shape<'a> {
        #[serde(borrow)]
        error: Option<&'a RawValue>,
        #[serde(borrow)]
        object: Option<&'a RawValue>,
        id: Option<serde::de::IgnoredAny>,
    }
    // Looked for first: an answer is read once more only if it may be one.
    memchr::memmem::find(body, b"\"error\"")?;
    let shape = serde_json::from_slice::<Shape<'_>>(body).ok()?;
    let said = shape.error.is_some_and(|error| error_said(error.get()))
        || shape
            .object
            .is_some_and(|object| crate::json::is_str(object, "error"));
    (said && shape.id.is_none())
        .then(|| ApiError::from_error_object(body, "The provider answered with an error."))
}

/// [`error_says`] of an `error` member's raw JSON.
pub fn error_said(raw: &str) -> bool {
    match raw {
        "null" | "false" | "0" | "\"\"" | "{}" | "[]" => false,
        _ => serde_json::from_str(raw).is_ok_and(|error| error_says(&error)),
    }
}

/// Whether what was kept of an event too long to hold (its head and tail)
/// is the provider's error event: an `error` member that says something
/// (one cut by the bound says a lot), or vLLM's `"object": "error"`.
pub fn kept_event_is_error(kept: &[u8]) -> bool {
    let event = read_event(kept);
    error_says(&event["error"]) || event["object"] == "error"
}

/// An error event's JSON; for one that is not whole (an event too long to
/// hold, of which its head and tail were kept), what can be read of it:
/// its first members of the names an error is read by that are whole in it
/// (a member inside a string is escaped, so cannot be taken for one); an
/// `error` cut short is taken as a message.
fn read_event(payload: &[u8]) -> serde_json::Value {
    use serde_json::Value;
    if let Ok(event) = serde_json::from_slice(payload) {
        return event;
    }
    let mut event = serde_json::Map::new();
    for key in ["error", "object", "code", "status", "type", "error_type"] {
        let member = format!("\"{key}\":");
        let Some(at) = memchr::memmem::find(payload, member.as_bytes()) else {
            continue;
        };
        let value = serde_json::Deserializer::from_slice(&payload[at + member.len()..])
            .into_iter::<Value>()
            .next();
        match value {
            Some(Ok(value)) => {
                event.insert(key.to_owned(), value);
            }
            Some(Err(_)) if key == "error" => {
                event.insert(key.to_owned(), Value::from("(cut by the gateway's bound)"));
            }
            _ => {}
        }
    }
    Value::Object(event)
}

/// The error object of an in-band error event: its `error`, a Responses
/// failure's `response.error`, or the event itself (vLLM's, a Responses
/// `error` event).
fn error_object(event: &serde_json::Value) -> &serde_json::Value {
    [&event["error"], &event["response"]["error"]]
        .into_iter()
        .find(|error| error.is_object())
        .unwrap_or(event)
}

impl ApiError {
    /// The provider's in-band error event (`payload`) as the gateway's own
    /// error, for a stream that has sent nothing yet: the status it stands
    /// for ([`error_status`] of its error object: its `error`, a Responses
    /// failure's `response.error`, or the event itself) and its message
    /// (unmasked: the caller masks
    /// the provider's key); a prompt too long as OpenAI says it.
    pub fn from_in_band(payload: &[u8]) -> Self {
        Self::from_error_object(payload, "The provider ended the stream with an error.")
    }

    /// [`ApiError::from_in_band`] of an error `payload`, saying `unsaid`
    /// when it has no message of its own.
    fn from_error_object(payload: &[u8], unsaid: &str) -> Self {
        let event = read_event(payload);
        let error = error_object(&event);
        let message: String = error["message"]
            .as_str()
            .or(error["error"].as_str())
            .filter(|message| !message.trim().is_empty())
            .unwrap_or(unsaid)
            .to_owned();
        match error_status(error) {
            429 => Self::new(429, "rate_limit_error", "upstream_rate_limited", message),
            400..=499
                if error["code"] == "context_length_exceeded"
                    || message.contains("maximum context length") =>
            {
                Self::context_length_exceeded(message)
            }
            status @ 400..=499 => {
                let param = error["param"].as_str().map(Box::from);
                let code = error["code"].as_str().map(|code| Box::new(code.to_owned()));
                let mut error = Self::bad_request(message);
                error.status = status;
                // The request field at fault and the error's code, as the
                // provider named them.
                error.param = param;
                error.provider_code = code;
                error
            }
            _ => Self::upstream_error(message),
        }
    }
}

/// The HTTP status an error object stands for: the one it names (`code`,
/// `status`, a number from 400 to 599, as vLLM and Gemini put it), else
/// the one its classes say (`code`, `status`, `type`, TGI's `error_type`:
/// see [`class_status`]; a rate limit over a refused key over a fault of
/// the request over a server error, so that a code naming a server in a
/// request's fault, as `invalid_mcp_server_url` does, stays the
/// request's), else a prompt too
/// long said in words (400), else 500: the provider's failure.
pub fn error_status(error: &serde_json::Value) -> u16 {
    use serde_json::Value;
    let fields = [
        &error["code"],
        &error["status"],
        &error["type"],
        &error["error_type"],
    ];
    let named = fields.iter().find_map(|field| {
        match field {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.trim().parse::<u64>().ok(),
            _ => None,
        }
        .filter(|status| (400..=599).contains(status))
    });
    if let Some(status) = named {
        return status as u16;
    }
    let classes: Vec<u16> = fields
        .iter()
        .filter_map(|field| field.as_str())
        .filter_map(class_status)
        .collect();
    if let Some(status) = [429, 401, 400, 500]
        .into_iter()
        .find(|c| classes.contains(c))
    {
        return status;
    }
    // OpenAI-compatible servers often say only this (see
    // `is_context_length_error`); TGI puts its message in `error` itself.
    let message = error["message"].as_str().or(error["error"].as_str());
    if message.is_some_and(|m| m.contains("maximum context length")) {
        return 400;
    }
    500
}

/// The status an error class names (OpenAI's `type` and `code`, vLLM's
/// exception names, Gemini's `status`, TGI's `error_type`), when it says
/// whose fault it was: a rate limit or an exhausted quota is 429; the
/// gateway's key refused 401; a fault of the request (invalid, a bad
/// request, failed validation, something
/// not found or not supported, an image that cannot be read, a content
/// filter, a prompt too long) 400; a server error, an overload, an outage
/// or a timeout 500.
fn class_status(class: &str) -> Option<u16> {
    let class = class.to_ascii_lowercase();
    let names = |words: &[&str]| words.iter().any(|word| class.contains(word));
    if names(&[
        "rate_limit",
        "ratelimit",
        "insufficient_quota",
        "resource_exhausted",
        "too_many_requests",
    ]) {
        Some(429)
    } else if names(&[
        "authentication",
        "unauthorized",
        "permission",
        "forbidden",
        "api_key",
    ]) {
        Some(401)
    } else if class.starts_with("invalid")
        || names(&[
            "bad_request",
            "badrequest",
            "validation",
            "not_found",
            "notfound",
            "unsupported",
            "image",
            "content_filter",
            "content_policy",
            "context_length",
            "too_large",
            "too_long",
            "unprocessable",
        ])
    {
        Some(400)
    } else if names(&[
        "server",
        "internal",
        "overloaded",
        "unavailable",
        "timeout",
        "api_error",
    ]) {
        Some(500)
    } else {
        None
    }
}
