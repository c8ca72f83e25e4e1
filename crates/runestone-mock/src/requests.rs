//! The OpenAI and Anthropic request formats the mock reads (pure: no I/O):
//! routing, request parsing, token estimates and the deterministic reply plan.

use crate::*;

/// An OpenAI-shaped error response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ApiError {
    /// HTTP status.
    pub(crate) status: u16,
    /// `error.message`.
    pub(crate) message: String,
    /// `error.type`.
    pub(crate) kind: &'static str,
    /// `error.code`.
    pub(crate) code: Option<&'static str>,
}

impl ApiError {
    /// 400 for a body that is not JSON, or JSON of the wrong shape.
    pub(crate) fn from_json(e: &serde_json::Error) -> Self {
        let code = match e.classify() {
            serde_json::error::Category::Data => "invalid_request",
            _ => "invalid_json",
        };
        ApiError {
            status: 400,
            message: format!("We could not parse the JSON body of your request: {e}"),
            kind: "invalid_request_error",
            code: Some(code),
        }
    }

    /// 400 for a request that parses but makes no sense.
    pub(crate) fn invalid(message: &str) -> Self {
        ApiError {
            status: 400,
            message: message.to_owned(),
            kind: "invalid_request_error",
            code: None,
        }
    }

    /// The error a status fault answers with.
    pub(crate) fn for_status(status: u16) -> Self {
        match status {
            429 => ApiError {
                status,
                message: "Rate limit reached for requests (runestone-mock fault)".to_owned(),
                kind: "rate_limit_error",
                code: Some("rate_limit_exceeded"),
            },
            500..=599 => ApiError {
                status,
                message: format!(
                    "The server had an error while processing your request (runestone-mock fault {status})"
                ),
                kind: "server_error",
                code: None,
            },
            _ => ApiError {
                status,
                message: format!("runestone-mock fault {status}"),
                kind: "invalid_request_error",
                code: None,
            },
        }
    }

    /// JSON body `{"error": {...}}`.
    pub(crate) fn body(&self) -> Vec<u8> {
        error_json(&self.message, self.kind, self.code)
    }
}

/// Serializes `{"error":{"message","type","param":null,"code"}}`.
pub(crate) fn error_json(message: &str, kind: &str, code: Option<&str>) -> Vec<u8> {
    /// `{"error": ...}` wrapper.
    #[derive(Serialize)]
    struct Envelope<'a> {
        error: Body<'a>,
    }
    /// OpenAI error object, fields in OpenAI's order.
    #[derive(Serialize)]
    struct Body<'a> {
        message: &'a str,
        #[serde(rename = "type")]
        kind: &'a str,
        param: Option<&'a str>,
        code: Option<&'a str>,
    }
    let v = Envelope {
        error: Body {
            message,
            kind,
            param: None,
            code,
        },
    };
    serde_json::to_vec(&v).unwrap_or_default()
}

/// Where a request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route<'a> {
    /// Chat completions, with the Azure deployment if any.
    Chat(Option<&'a str>),
    /// Legacy completions, with the Azure deployment if any.
    Completions(Option<&'a str>),
    /// Embeddings, with the Azure deployment if any.
    Embeddings(Option<&'a str>),
    /// `GET /v1/models`.
    Models,
    /// `GET /v1/models/{id}`.
    Model(&'a str),
    /// Anthropic `POST /v1/messages`.
    Messages,
    /// `POST /v1/responses` (or Azure's `/openai/responses`).
    Responses,
    /// An operation on a stored response.
    ResponseOp(ResponseOp, &'a str),
    /// Anything else.
    NotFound,
}

/// Maps method and path to a [`Route`].
pub(crate) fn route<'a>(method: &Method, path: &'a str) -> Route<'a> {
    let post = method == Method::POST;
    let get = method == Method::GET;
    match path {
        "/v1/chat/completions" if post => return Route::Chat(None),
        "/v1/completions" if post => return Route::Completions(None),
        "/v1/embeddings" if post => return Route::Embeddings(None),
        "/v1/models" if get => return Route::Models,
        "/v1/messages" if post => return Route::Messages,
        "/v1/responses" | "/openai/responses" if post => return Route::Responses,
        _ => {}
    }
    if let Some(rest) = path
        .strip_prefix("/v1/responses/")
        .or_else(|| path.strip_prefix("/openai/responses/"))
    {
        let op = match rest.split_once('/') {
            None if get => Some((ResponseOp::Get, rest)),
            None if method == Method::DELETE => Some((ResponseOp::Delete, rest)),
            Some((id, "cancel")) if post => Some((ResponseOp::Cancel, id)),
            Some((id, "input_items")) if get => Some((ResponseOp::InputItems, id)),
            _ => None,
        };
        if let Some((op, id)) = op.filter(|(_, id)| !id.is_empty()) {
            return Route::ResponseOp(op, id);
        }
    }
    if get {
        if let Some(id) = path.strip_prefix("/v1/models/") {
            if !id.is_empty() {
                return Route::Model(id);
            }
        }
    }
    if post {
        if let Some((dep, rest)) = path
            .strip_prefix("/openai/deployments/")
            .and_then(|r| r.split_once('/'))
        {
            if !dep.is_empty() {
                match rest {
                    "chat/completions" => return Route::Chat(Some(dep)),
                    "completions" => return Route::Completions(Some(dep)),
                    "embeddings" => return Route::Embeddings(Some(dep)),
                    _ => {}
                }
            }
        }
    }
    Route::NotFound
}

/// `stream_options` of a request.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct StreamOptions {
    /// Send a final usage event.
    #[serde(default)]
    pub(crate) include_usage: Option<bool>,
}

/// One chat message (only the content matters).
#[derive(Debug, Deserialize)]
pub(crate) struct ChatMessage {
    /// `user`, `assistant`, ...
    #[serde(default)]
    pub(crate) role: Option<String>,
    /// String, array of parts, or null.
    #[serde(default)]
    pub(crate) content: Option<Value>,
}

/// A prefill: when the last message is the assistant's, the mock continues
/// it. Its text is counted in `tokN` words, so a continuation of `tok0 tok1 `
/// starts at `tok2`.
pub(crate) fn prefill_tokens(messages: &[ChatMessage]) -> u64 {
    let Some(last) = messages.last() else {
        return 0;
    };
    if last.role.as_deref() != Some("assistant") {
        return 0;
    }
    let text = match &last.content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    };
    text.split_whitespace()
        .filter(|w| {
            w.starts_with("tok") && w[3..].bytes().all(|b| b.is_ascii_digit()) && w.len() > 3
        })
        .count() as u64
}

/// Whether the conversation ends with an assistant message (a prefill).
pub(crate) fn ends_with_prefill(messages: &[ChatMessage]) -> bool {
    messages.last().and_then(|m| m.role.as_deref()) == Some("assistant")
}

/// Fields of `/v1/chat/completions` the mock reads.
#[derive(Debug, Deserialize)]
pub(crate) struct ChatBody {
    #[serde(default)]
    pub(crate) model: Option<String>,
    #[serde(default)]
    pub(crate) messages: Option<Vec<ChatMessage>>,
    #[serde(default)]
    pub(crate) max_tokens: Option<u64>,
    #[serde(default)]
    pub(crate) max_completion_tokens: Option<u64>,
    #[serde(default)]
    pub(crate) stream: Option<bool>,
    #[serde(default)]
    pub(crate) stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub(crate) mock_tokens: Option<u64>,
    #[serde(default)]
    pub(crate) service_tier: Option<String>,
    #[serde(default)]
    pub(crate) mock_service_tier: Option<String>,
}

/// Fields of `/v1/completions` the mock reads.
#[derive(Debug, Deserialize)]
pub(crate) struct CompletionBody {
    #[serde(default)]
    pub(crate) model: Option<String>,
    #[serde(default)]
    pub(crate) prompt: Option<Value>,
    #[serde(default)]
    pub(crate) max_tokens: Option<u64>,
    #[serde(default)]
    pub(crate) stream: Option<bool>,
    #[serde(default)]
    pub(crate) stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub(crate) mock_tokens: Option<u64>,
}

/// Fields of `/v1/embeddings` the mock reads.
#[derive(Debug, Deserialize)]
pub(crate) struct EmbeddingsBody {
    #[serde(default)]
    pub(crate) model: Option<String>,
    #[serde(default)]
    pub(crate) input: Option<Value>,
    #[serde(default)]
    pub(crate) encoding_format: Option<String>,
}

/// How long a reply is and why it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Completion tokens to generate.
    pub(crate) tokens: u64,
    /// `"stop"` or `"length"`.
    pub(crate) finish_reason: &'static str,
}

/// Reply length: `min(mock_tokens or 16, cap)`, `"length"` when the cap cut it.
pub(crate) fn plan(mock_tokens: Option<u64>, caps: &[Option<u64>]) -> Plan {
    let natural = mock_tokens
        .unwrap_or(DEFAULT_COMPLETION_TOKENS)
        .min(MAX_MOCK_TOKENS);
    let cap = caps.iter().flatten().copied().min();
    match cap {
        Some(c) if c < natural => Plan {
            tokens: c,
            finish_reason: "length",
        },
        _ => Plan {
            tokens: natural,
            finish_reason: "stop",
        },
    }
}

/// `ceil(bytes / 4)`.
pub(crate) fn bytes_to_tokens(bytes: u64) -> u64 {
    bytes.div_ceil(4)
}

/// Bytes of the text in a message `content` (string or array of text parts).
pub(crate) fn content_bytes(content: &Value) -> u64 {
    match content {
        Value::String(s) => s.len() as u64,
        Value::Array(parts) => parts
            .iter()
            .map(|p| match p {
                Value::String(s) => s.len() as u64,
                Value::Object(o) => o
                    .get("text")
                    .and_then(Value::as_str)
                    .map_or(0, |s| s.len() as u64),
                _ => 0,
            })
            .sum(),
        _ => 0,
    }
}

/// Chat prompt tokens: `ceil(content bytes / 4) + 4 * messages`, at least 1.
pub(crate) fn chat_prompt_tokens(messages: &[ChatMessage]) -> u64 {
    let bytes: u64 = messages
        .iter()
        .filter_map(|m| m.content.as_ref())
        .map(content_bytes)
        .sum();
    (bytes_to_tokens(bytes) + 4 * messages.len() as u64).max(1)
}

/// Legacy prompt tokens: `ceil(string bytes / 4) + literal token ids`, at least 1.
pub(crate) fn completion_prompt_tokens(prompt: Option<&Value>) -> u64 {
    /// Accumulates string bytes and literal token ids.
    fn walk(v: &Value, bytes: &mut u64, ids: &mut u64) {
        match v {
            Value::String(s) => *bytes += s.len() as u64,
            Value::Number(_) => *ids += 1,
            Value::Array(items) => items.iter().for_each(|i| walk(i, bytes, ids)),
            _ => {}
        }
    }
    let (mut bytes, mut ids) = (0, 0);
    if let Some(p) = prompt {
        walk(p, &mut bytes, &mut ids);
    }
    (bytes_to_tokens(bytes) + ids).max(1)
}

/// A parsed generation request (chat or legacy completion).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GenRequest {
    /// Model named by the request (or deployment).
    pub(crate) model: Option<String>,
    /// Prompt tokens reported in usage.
    pub(crate) prompt_tokens: u64,
    /// Reply length.
    pub(crate) plan: Plan,
    /// The first token generated (a prefill's length; 0 without one).
    pub(crate) start: u64,
    /// The conversation ends with an assistant message.
    pub(crate) prefilled: bool,
    /// SSE response requested.
    pub(crate) stream: bool,
    /// Final usage event requested.
    pub(crate) include_usage: bool,
    /// The processing tier the answer says served it ([`served_tier`]).
    pub(crate) service_tier: Option<String>,
}

/// The tier an answer reports: `mock_service_tier` when the request sets it
/// (a tier other than the one asked for, as when OpenAI serves a priority
/// request at the standard tier), else the one asked for, as OpenAI names
/// it (`fast` is `priority`, `auto` is `default`); none when neither is
/// given.
pub(crate) fn served_tier(asked: Option<String>, forced: Option<String>) -> Option<String> {
    forced.or_else(|| {
        asked.map(|tier| match tier.as_str() {
            "fast" => "priority".to_owned(),
            "auto" => "default".to_owned(),
            _ => tier,
        })
    })
}

impl GenRequest {
    /// Tokens this answer generates (after any prefill).
    pub(crate) fn generated(&self) -> u64 {
        self.plan.tokens.saturating_sub(self.start)
    }
}

/// Parses a chat completion request.
pub(crate) fn parse_chat(body: &[u8], deployment: Option<&str>) -> Result<GenRequest, ApiError> {
    let b: ChatBody = serde_json::from_slice(body).map_err(|e| ApiError::from_json(&e))?;
    let messages = b.messages.unwrap_or_default();
    // A token limit bounds what is generated, after any prefill.
    let start = prefill_tokens(&messages);
    let cap = |c: Option<u64>| c.map(|c| c.saturating_add(start));
    Ok(GenRequest {
        model: b.model.or_else(|| deployment.map(str::to_owned)),
        prompt_tokens: chat_prompt_tokens(&messages),
        plan: plan(
            b.mock_tokens,
            &[cap(b.max_tokens), cap(b.max_completion_tokens)],
        ),
        start,
        prefilled: ends_with_prefill(&messages),
        stream: b.stream.unwrap_or(false),
        include_usage: b
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        service_tier: served_tier(b.service_tier, b.mock_service_tier),
    })
}

/// Parses a legacy completion request.
pub(crate) fn parse_completion(
    body: &[u8],
    deployment: Option<&str>,
) -> Result<GenRequest, ApiError> {
    let b: CompletionBody = serde_json::from_slice(body).map_err(|e| ApiError::from_json(&e))?;
    Ok(GenRequest {
        model: b.model.or_else(|| deployment.map(str::to_owned)),
        prompt_tokens: completion_prompt_tokens(b.prompt.as_ref()),
        plan: plan(b.mock_tokens, &[b.max_tokens]),
        start: 0,
        prefilled: false,
        stream: b.stream.unwrap_or(false),
        include_usage: b
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        service_tier: None,
    })
}

/// A parsed embeddings request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct EmbeddingsRequest {
    /// Model named by the request (or deployment).
    pub(crate) model: Option<String>,
    /// One vector per input.
    pub(crate) vectors: Vec<[f32; EMBEDDING_DIMS]>,
    /// Prompt tokens reported in usage.
    pub(crate) prompt_tokens: u64,
    /// Base64 encoding requested.
    pub(crate) base64: bool,
}

/// Deterministic unit vector derived from SHA-256 of `data`.
pub(crate) fn embed(data: &[u8]) -> [f32; EMBEDDING_DIMS] {
    let digest = Sha256::digest(data);
    let mut v = [0f64; EMBEDDING_DIMS];
    for (i, x) in v.iter_mut().enumerate() {
        let word = u32::from_le_bytes([
            digest[4 * i],
            digest[4 * i + 1],
            digest[4 * i + 2],
            digest[4 * i + 3],
        ]);
        *x = f64::from(word) / f64::from(u32::MAX) * 2.0 - 1.0;
    }
    let norm = v
        .iter()
        .map(|x| x * x)
        .sum::<f64>()
        .sqrt()
        .max(f64::MIN_POSITIVE);
    v.map(|x| (x / norm) as f32)
}

/// Parses an embeddings request.
pub(crate) fn parse_embeddings(
    body: &[u8],
    deployment: Option<&str>,
) -> Result<EmbeddingsRequest, ApiError> {
    let b: EmbeddingsBody = serde_json::from_slice(body).map_err(|e| ApiError::from_json(&e))?;
    let is_ids = |v: &Value| matches!(v, Value::Array(a) if a.iter().all(Value::is_number));
    let bad =
        || ApiError::invalid("'input' must be a string, an array of strings, or token arrays");
    let input = b
        .input
        .ok_or_else(|| ApiError::invalid("'input' is a required property"))?;
    let items: Vec<&Value> = match &input {
        Value::String(_) => vec![&input],
        Value::Array(a) if !a.is_empty() && a.iter().all(Value::is_number) => vec![&input],
        Value::Array(a) if !a.is_empty() => a.iter().collect(),
        _ => return Err(bad()),
    };
    let mut vectors = Vec::with_capacity(items.len());
    let mut tokens = 0;
    for item in items {
        match item {
            Value::String(s) => {
                tokens += bytes_to_tokens(s.len() as u64);
                vectors.push(embed(s.as_bytes()));
            }
            Value::Array(ids) if is_ids(item) => {
                tokens += ids.len() as u64;
                vectors.push(embed(item.to_string().as_bytes()));
            }
            _ => return Err(bad()),
        }
    }
    Ok(EmbeddingsRequest {
        model: b.model.or_else(|| deployment.map(str::to_owned)),
        vectors,
        prompt_tokens: tokens.max(1),
        base64: b.encoding_format.as_deref() == Some("base64"),
    })
}

/// Standard base64 (with padding).
pub(crate) fn base64_encode(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A request after routing and body parsing.
#[derive(Debug)]
pub(crate) enum ApiCall {
    /// Chat completion.
    Chat(GenRequest),
    /// Legacy completion.
    Completion(GenRequest),
    /// Embeddings.
    Embeddings(EmbeddingsRequest),
    /// Anthropic Messages, with the first tool's name when tools were sent.
    Messages(GenRequest, Option<String>),
    /// Model list.
    Models,
    /// One model.
    Model(String),
    /// Unknown URL.
    NotFound,
    /// Body could not be parsed.
    Invalid(ApiError, Option<String>),
    /// A Responses API request.
    Responses(GenRequest, ResponsesExtra),
    /// An operation on a stored response.
    ResponseOp(ResponseOp, String),
    /// Moderations, images or audio.
    Media(MediaCall),
}

impl ApiCall {
    /// Routes and parses a request.
    pub(crate) fn parse(method: &Method, path: &str, body: &[u8]) -> Self {
        match route(method, path) {
            Route::Chat(dep) => parse_chat(body, dep).map_or_else(
                |e| ApiCall::Invalid(e, dep.map(str::to_owned)),
                ApiCall::Chat,
            ),
            Route::Completions(dep) => parse_completion(body, dep).map_or_else(
                |e| ApiCall::Invalid(e, dep.map(str::to_owned)),
                ApiCall::Completion,
            ),
            Route::Embeddings(dep) => parse_embeddings(body, dep).map_or_else(
                |e| ApiCall::Invalid(e, dep.map(str::to_owned)),
                ApiCall::Embeddings,
            ),
            Route::Messages => parse_messages(body).map_or_else(
                |e| ApiCall::Invalid(e, None),
                |(g, tool)| ApiCall::Messages(g, tool),
            ),
            Route::Responses => parse_responses(body).map_or_else(
                |e| ApiCall::Invalid(e, None),
                |(g, extra)| ApiCall::Responses(g, extra),
            ),
            Route::ResponseOp(op, id) => ApiCall::ResponseOp(op, id.to_owned()),
            Route::Models => ApiCall::Models,
            Route::Model(id) => ApiCall::Model(id.to_owned()),
            Route::NotFound => ApiCall::NotFound,
        }
    }

    /// Model named by the request, if any.
    pub(crate) fn model(&self) -> Option<&str> {
        match self {
            ApiCall::Chat(g)
            | ApiCall::Completion(g)
            | ApiCall::Messages(g, _)
            | ApiCall::Responses(g, _) => g.model.as_deref(),
            ApiCall::Embeddings(e) => e.model.as_deref(),
            ApiCall::Media(m) => m.model.as_deref(),
            ApiCall::Invalid(_, dep) => dep.as_deref(),
            ApiCall::Models | ApiCall::Model(_) | ApiCall::NotFound | ApiCall::ResponseOp(..) => {
                None
            }
        }
    }

    /// Whether the conversation ends with an assistant message to continue.
    pub(crate) fn prefilled(&self) -> bool {
        match self {
            ApiCall::Chat(g) | ApiCall::Messages(g, _) => g.prefilled,
            _ => false,
        }
    }

    /// Whether the answer is an SSE stream.
    pub(crate) fn is_stream(&self) -> bool {
        matches!(self, ApiCall::Chat(g) | ApiCall::Completion(g) | ApiCall::Messages(g, _) | ApiCall::Responses(g, _) if g.stream)
    }
}
