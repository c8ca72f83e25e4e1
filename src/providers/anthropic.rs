//! OpenAI chat completions <-> the Anthropic Messages API.
//!
//! Clients keep speaking OpenAI; these functions translate the request
//! ([`to_messages_request`]), a JSON answer ([`to_chat_completion`]), an SSE
//! stream event by event ([`StreamTranslator`], which never buffers more than
//! a partial line), and errors ([`to_openai_error`]). All are pure: the
//! gateway glue decides when to call them.
//!
//! Mapping, in short: `system`/`developer` messages become the top-level
//! `system`; `tool` messages become `tool_result` blocks of a user turn;
//! assistant `tool_calls` become `tool_use` blocks; consecutive turns of one
//! role merge (Anthropic requires alternation); image parts become `image`
//! blocks (base64 for data URLs, `url` otherwise); `tools`, `tool_choice`,
//! `stop`, `temperature`, `top_p` and `stream` carry over; `max_tokens` (or
//! `max_completion_tokens`) is required by Anthropic and defaults to
//! [`DEFAULT_MAX_TOKENS`].

use crate::cost::Usage;
use crate::openai::ApiError;
use bytes::{Bytes, BytesMut};
use serde_json::{json, Map, Value};

/// `max_tokens` sent when the client gives none (Anthropic requires one).
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

/// The `anthropic-version` header value the translation follows.
pub const API_VERSION: &str = "2023-06-01";

fn invalid(param: &str, detail: &str) -> ApiError {
    ApiError::invalid_field(param, detail)
}

/// Translates an OpenAI chat completions body into a Messages API body for
/// `model`.
pub fn to_messages_request(body: &[u8], model: &str) -> Result<Vec<u8>, ApiError> {
    let request: Map<String, Value> =
        serde_json::from_slice(body).map_err(ApiError::invalid_json)?;
    let messages = request
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid("messages", "expected an array of messages"))?;
    let mut system: Vec<Value> = Vec::new();
    let mut turns: Vec<(String, Vec<Value>)> = Vec::new();
    for (i, message) in messages.iter().enumerate() {
        let role = message["role"]
            .as_str()
            .ok_or_else(|| invalid("messages", &format!("message {i} has no role")))?;
        let (role, blocks) = match role {
            "system" | "developer" => {
                system.extend(content_blocks(&message["content"], i)?);
                continue;
            }
            "user" => ("user", content_blocks(&message["content"], i)?),
            "assistant" => {
                let mut blocks = match &message["content"] {
                    Value::Null => Vec::new(),
                    content => content_blocks(content, i)?,
                };
                for call in message["tool_calls"].as_array().into_iter().flatten() {
                    let arguments = call["function"]["arguments"].as_str().unwrap_or("{}");
                    let input: Value =
                        serde_json::from_str(arguments).unwrap_or_else(|_| json!({}));
                    blocks.push(json!({
                        "type": "tool_use",
                        "id": call["id"],
                        "name": call["function"]["name"],
                        "input": input,
                    }));
                }
                ("assistant", blocks)
            }
            "tool" => {
                let content = match &message["content"] {
                    Value::String(text) => json!(text),
                    other => Value::Array(content_blocks(other, i)?),
                };
                let block = json!({
                    "type": "tool_result",
                    "tool_use_id": message["tool_call_id"],
                    "content": content,
                });
                ("user", vec![block])
            }
            other => {
                return Err(invalid(
                    "messages",
                    &format!("message {i} has an unknown role '{other}'"),
                ))
            }
        };
        match turns.last_mut() {
            Some((last, existing)) if last == role => existing.extend(blocks),
            _ => turns.push((role.to_string(), blocks)),
        }
    }
    let mut out = Map::new();
    out.insert("model".into(), json!(model));
    let max_tokens = request
        .get("max_completion_tokens")
        .or_else(|| request.get("max_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(DEFAULT_MAX_TOKENS);
    out.insert("max_tokens".into(), json!(max_tokens));
    out.insert(
        "messages".into(),
        Value::Array(
            turns
                .into_iter()
                .map(|(role, content)| json!({"role": role, "content": content}))
                .collect(),
        ),
    );
    if !system.is_empty() {
        out.insert("system".into(), Value::Array(system));
    }
    for key in ["temperature", "top_p", "stream"] {
        if let Some(value) = request.get(key).filter(|v| !v.is_null()) {
            out.insert(key.into(), value.clone());
        }
    }
    match request.get("stop") {
        Some(Value::String(stop)) => {
            out.insert("stop_sequences".into(), json!([stop]));
        }
        Some(Value::Array(stops)) => {
            out.insert("stop_sequences".into(), Value::Array(stops.clone()));
        }
        _ => {}
    }
    if let Some(tools) = request.get("tools").and_then(Value::as_array) {
        let tools: Vec<Value> = tools
            .iter()
            .map(|tool| {
                let function = &tool["function"];
                let mut out = json!({
                    "name": function["name"],
                    "input_schema": if function["parameters"].is_null() { json!({"type": "object"}) } else { function["parameters"].clone() },
                });
                if let Some(description) = function["description"].as_str() {
                    out["description"] = json!(description);
                }
                out
            })
            .collect();
        out.insert("tools".into(), Value::Array(tools));
    }
    if let Some(choice) = request.get("tool_choice") {
        let choice = match choice {
            Value::String(s) if s == "auto" => Some(json!({"type": "auto"})),
            Value::String(s) if s == "none" => Some(json!({"type": "none"})),
            Value::String(s) if s == "required" => Some(json!({"type": "any"})),
            Value::Object(o) if o.get("type") == Some(&json!("function")) => {
                Some(json!({"type": "tool", "name": choice["function"]["name"]}))
            }
            _ => {
                return Err(invalid(
                    "tool_choice",
                    "expected auto, none, required or a function",
                ))
            }
        };
        if let Some(choice) = choice {
            out.insert("tool_choice".into(), choice);
        }
    }
    if let Some(user) = request.get("user").and_then(Value::as_str) {
        out.insert("metadata".into(), json!({"user_id": user}));
    }
    Ok(serde_json::to_vec(&Value::Object(out)).expect("a JSON value serialises"))
}

/// OpenAI message content (a string or parts) as Anthropic content blocks.
fn content_blocks(content: &Value, index: usize) -> Result<Vec<Value>, ApiError> {
    match content {
        Value::String(text) => Ok(vec![json!({"type": "text", "text": text})]),
        Value::Array(parts) => parts
            .iter()
            .map(|part| match part["type"].as_str() {
                Some("text") => Ok(json!({"type": "text", "text": part["text"]})),
                Some("image_url") => {
                    let url = part["image_url"]["url"].as_str().unwrap_or_default();
                    Ok(image_block(url))
                }
                _ => Err(invalid(
                    "messages",
                    &format!("message {index} has a content part of an unsupported type"),
                )),
            })
            .collect(),
        Value::Null => Ok(Vec::new()),
        _ => Err(invalid(
            "messages",
            &format!("message {index} has content of the wrong type"),
        )),
    }
}

fn image_block(url: &str) -> Value {
    if let Some(rest) = url.strip_prefix("data:") {
        if let Some((media, data)) = rest.split_once(";base64,") {
            return json!({"type": "image", "source": {"type": "base64", "media_type": media, "data": data}});
        }
    }
    json!({"type": "image", "source": {"type": "url", "url": url}})
}

/// Anthropic `stop_reason` as an OpenAI `finish_reason`.
fn finish_reason(stop_reason: Option<&str>) -> Option<&'static str> {
    match stop_reason? {
        "end_turn" | "stop_sequence" | "pause_turn" => Some("stop"),
        "max_tokens" => Some("length"),
        "tool_use" => Some("tool_calls"),
        "refusal" => Some("content_filter"),
        _ => Some("stop"),
    }
}

/// Anthropic usage as OpenAI's: cache reads and writes are prompt tokens,
/// cache reads are the cached ones.
fn usage_of(usage: &Value) -> Usage {
    let n = |key: &str| {
        usage[key]
            .as_u64()
            .unwrap_or(0)
            .min(crate::cost::MAX_REPORTED_TOKENS)
    };
    let cache_read = n("cache_read_input_tokens");
    Usage {
        prompt_tokens: n("input_tokens") + cache_read + n("cache_creation_input_tokens"),
        completion_tokens: n("output_tokens"),
        cached_tokens: cache_read,
        estimated: false,
    }
}

fn usage_json(usage: &Usage) -> Value {
    json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total(),
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    })
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Translates a Messages API answer into a `chat.completion`, with its usage.
pub fn to_chat_completion(body: &[u8], public_model: &str) -> Result<(Vec<u8>, Usage), ApiError> {
    let message: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::upstream_error(format!("The provider answered with invalid JSON: {e}"))
    })?;
    let mut text = String::new();
    let mut tool_calls = Vec::new();
    for block in message["content"].as_array().into_iter().flatten() {
        match block["type"].as_str() {
            Some("text") => text.push_str(block["text"].as_str().unwrap_or_default()),
            Some("tool_use") => tool_calls.push(json!({
                "id": block["id"],
                "type": "function",
                "function": {"name": block["name"], "arguments": block["input"].to_string()},
            })),
            _ => {}
        }
    }
    let usage = usage_of(&message["usage"]);
    let mut reply = json!({"role": "assistant", "content": if text.is_empty() && !tool_calls.is_empty() { Value::Null } else { json!(text) }});
    if !tool_calls.is_empty() {
        reply["tool_calls"] = Value::Array(tool_calls);
    }
    let completion = json!({
        "id": message["id"],
        "object": "chat.completion",
        "created": unix_now(),
        "model": public_model,
        "choices": [{
            "index": 0,
            "message": reply,
            "finish_reason": finish_reason(message["stop_reason"].as_str()),
            "logprobs": null,
        }],
        "usage": usage_json(&usage),
    });
    Ok((
        serde_json::to_vec(&completion).expect("a JSON value serialises"),
        usage,
    ))
}

/// An Anthropic error answer as the OpenAI error the client should see.
pub fn to_openai_error(status: u16, body: &[u8]) -> ApiError {
    let parsed: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let message = parsed["error"]["message"]
        .as_str()
        .unwrap_or("The provider returned an error.")
        .to_string();
    let mut error = match (status, parsed["error"]["type"].as_str()) {
        (404, _) | (_, Some("not_found_error")) => ApiError::model_not_found(&message),
        (413, _) | (_, Some("request_too_large")) => {
            let mut e = ApiError::bad_request(message.clone());
            e.status = 413;
            e
        }
        (400, _) | (_, Some("invalid_request_error")) => ApiError::bad_request(message.clone()),
        (429, _) | (_, Some("rate_limit_error")) => ApiError::provider_rate_limited("anthropic"),
        _ => ApiError::upstream_error(message.clone()),
    };
    error.message = message.into_boxed_str();
    error
}

/// Translates an Anthropic SSE stream into OpenAI `chat.completion.chunk`
/// events as it arrives.
#[derive(Debug)]
pub struct StreamTranslator {
    partial: BytesMut,
    event: Option<String>,
    id: String,
    public_model: String,
    created: u64,
    include_usage: bool,
    usage: Usage,
    saw_usage: bool,
    tool_index: std::collections::HashMap<u64, usize>,
    finished: bool,
    generated_bytes: u64,
    oversized: bool,
}

impl StreamTranslator {
    /// A translator answering as `public_model`; `include_usage` when the
    /// client asked for a final usage chunk.
    pub fn new(public_model: &str, include_usage: bool) -> Self {
        StreamTranslator {
            partial: BytesMut::new(),
            event: None,
            id: String::new(),
            public_model: public_model.to_string(),
            created: unix_now(),
            include_usage,
            usage: Usage::default(),
            saw_usage: false,
            tool_index: Default::default(),
            finished: false,
            generated_bytes: 0,
            oversized: false,
        }
    }

    /// Usage reported so far (cache tokens included), if any.
    pub fn usage(&self) -> Option<Usage> {
        self.saw_usage.then_some(self.usage)
    }

    /// Bytes of generated text and tool arguments seen, for an estimate
    /// when the stream breaks before any usage.
    pub fn generated_bytes(&self) -> u64 {
        self.generated_bytes
    }

    /// Whether the stream ended properly (`message_stop` or an error event).
    pub fn finished(&self) -> bool {
        self.finished
    }

    /// Takes one upstream chunk; returns the OpenAI events it completes.
    pub fn feed(&mut self, chunk: &[u8]) -> Bytes {
        let mut chunk = chunk;
        if self.oversized {
            // The rest of a line too long to translate is dropped.
            match chunk.iter().position(|&b| b == b'\n') {
                None => return Bytes::new(),
                Some(i) => {
                    chunk = &chunk[i + 1..];
                    self.oversized = false;
                }
            }
        }
        self.partial.extend_from_slice(chunk);
        let mut out = BytesMut::new();
        while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
            let line = self.partial.split_to(end + 1);
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\r', '\n']);
            if let Some(event) = line.strip_prefix("event:") {
                self.event = Some(event.trim().to_string());
            } else if let Some(data) = line.strip_prefix("data:") {
                let data = data.trim();
                if let Ok(value) = serde_json::from_str::<Value>(data) {
                    let kind = value["type"]
                        .as_str()
                        .map(str::to_string)
                        .or_else(|| self.event.clone());
                    self.translate(kind.as_deref().unwrap_or_default(), &value, &mut out);
                }
            } else if line.is_empty() {
                self.event = None;
            }
        }
        if self.partial.len() > crate::cost::MAX_LINE_BYTES {
            self.partial.clear();
            self.oversized = true;
        }
        out.freeze()
    }

    fn chunk(&self, delta: Value, finish: Option<&str>) -> Value {
        let mut chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.public_model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}],
        });
        if self.include_usage {
            chunk["usage"] = Value::Null;
        }
        chunk
    }

    fn emit(out: &mut BytesMut, value: &Value) {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(value.to_string().as_bytes());
        out.extend_from_slice(b"\n\n");
    }

    fn translate(&mut self, kind: &str, event: &Value, out: &mut BytesMut) {
        match kind {
            "message_start" => {
                let message = &event["message"];
                self.id = message["id"]
                    .as_str()
                    .unwrap_or("chatcmpl-anthropic")
                    .to_string();
                if message["usage"].is_object() {
                    self.usage = usage_of(&message["usage"]);
                    self.saw_usage = true;
                }
                let chunk = self.chunk(json!({"role": "assistant", "content": ""}), None);
                Self::emit(out, &chunk);
            }
            "content_block_start" => {
                let block = &event["content_block"];
                if block["type"] == "tool_use" {
                    let index = self.tool_index.len();
                    self.tool_index
                        .insert(event["index"].as_u64().unwrap_or(0), index);
                    let delta = json!({"tool_calls": [{
                        "index": index,
                        "id": block["id"],
                        "type": "function",
                        "function": {"name": block["name"], "arguments": ""},
                    }]});
                    let chunk = self.chunk(delta, None);
                    Self::emit(out, &chunk);
                }
            }
            "content_block_delta" => {
                let delta = &event["delta"];
                let piece = delta["text"]
                    .as_str()
                    .or(delta["partial_json"].as_str())
                    .unwrap_or_default();
                self.generated_bytes += piece.len() as u64;
                let openai = match delta["type"].as_str() {
                    Some("text_delta") => json!({"content": delta["text"]}),
                    Some("input_json_delta") => {
                        let index = self
                            .tool_index
                            .get(&event["index"].as_u64().unwrap_or(0))
                            .copied()
                            .unwrap_or(0);
                        json!({"tool_calls": [{"index": index, "function": {"arguments": delta["partial_json"]}}]})
                    }
                    _ => return,
                };
                let chunk = self.chunk(openai, None);
                Self::emit(out, &chunk);
            }
            "message_delta" => {
                if event["usage"].is_object() {
                    let update = usage_of(&event["usage"]);
                    self.usage.completion_tokens = update.completion_tokens;
                    if update.prompt_tokens > 0 {
                        self.usage.prompt_tokens = update.prompt_tokens;
                        self.usage.cached_tokens = update.cached_tokens;
                    }
                    self.saw_usage = true;
                }
                let finish =
                    finish_reason(event["delta"]["stop_reason"].as_str()).unwrap_or("stop");
                let chunk = self.chunk(json!({}), Some(finish));
                Self::emit(out, &chunk);
            }
            "message_stop" => {
                if self.include_usage {
                    let chunk = json!({
                        "id": self.id,
                        "object": "chat.completion.chunk",
                        "created": self.created,
                        "model": self.public_model,
                        "choices": [],
                        "usage": usage_json(&self.usage),
                    });
                    Self::emit(out, &chunk);
                }
                out.extend_from_slice(b"data: [DONE]\n\n");
                self.finished = true;
            }
            "error" => {
                let status = match event["error"]["type"].as_str() {
                    Some("overloaded_error") => 529,
                    Some("rate_limit_error") => 429,
                    _ => 500,
                };
                let error = to_openai_error(status, event.to_string().as_bytes());
                out.extend_from_slice(&error.sse_event());
                self.finished = true;
            }
            _ => {} // ping, content_block_stop
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn translate(body: Value) -> Value {
        serde_json::from_slice(
            &to_messages_request(body.to_string().as_bytes(), "claude-x").unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn moves_system_messages_and_defaults_max_tokens() {
        let out = translate(json!({
            "model": "public",
            "messages": [
                {"role": "system", "content": "Be terse."},
                {"role": "user", "content": "Hi"},
                {"role": "user", "content": [{"type": "text", "text": "again"}]},
            ],
            "temperature": 0.2, "top_p": 0.9, "stop": "END", "stream": true,
        }));
        assert_eq!(out["model"], "claude-x");
        assert_eq!(out["max_tokens"], DEFAULT_MAX_TOKENS);
        assert_eq!(
            out["system"],
            json!([{"type": "text", "text": "Be terse."}])
        );
        assert_eq!(
            out["messages"],
            json!([{"role": "user", "content": [
            {"type": "text", "text": "Hi"}, {"type": "text", "text": "again"}]}]),
            "same-role turns merge"
        );
        assert_eq!(
            (out["temperature"].clone(), out["top_p"].clone()),
            (json!(0.2), json!(0.9))
        );
        assert_eq!(out["stop_sequences"], json!(["END"]));
        assert_eq!(out["stream"], true);
    }

    #[test]
    fn translates_tools_tool_calls_and_results() {
        let out = translate(json!({
            "model": "public", "max_completion_tokens": 50,
            "messages": [
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Oslo\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
            ],
            "tools": [{"type": "function", "function": {"name": "weather", "description": "Get weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
            "tool_choice": {"type": "function", "function": {"name": "weather"}},
        }));
        assert_eq!(out["max_tokens"], 50);
        assert_eq!(
            out["messages"][1]["content"][0],
            json!({"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Oslo"}})
        );
        assert_eq!(
            out["messages"][2],
            json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "Sunny"}]})
        );
        assert_eq!(
            out["tools"][0]["input_schema"]["properties"]["city"]["type"],
            "string"
        );
        assert_eq!(out["tools"][0]["description"], "Get weather");
        assert_eq!(
            out["tool_choice"],
            json!({"type": "tool", "name": "weather"})
        );
    }

    #[test]
    fn translates_images() {
        let out = translate(
            json!({"model": "m", "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
            ]}]}),
        );
        let content = &out["messages"][0]["content"];
        assert_eq!(
            content[0]["source"],
            json!({"type": "base64", "media_type": "image/png", "data": "AAAA"})
        );
        assert_eq!(
            content[1]["source"],
            json!({"type": "url", "url": "https://example.com/cat.png"})
        );
    }

    #[test]
    fn rejects_messages_it_cannot_translate() {
        for body in [
            json!({"model": "m"}),
            json!({"model": "m", "messages": [{"role": "robot", "content": "x"}]}),
        ] {
            let err = to_messages_request(body.to_string().as_bytes(), "c").unwrap_err();
            assert_eq!(err.status, 400);
        }
    }

    #[test]
    fn translates_a_json_answer_with_cache_usage() {
        let answer = json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
            "content": [{"type": "text", "text": "Hello"}, {"type": "tool_use", "id": "tu_1", "name": "f", "input": {"a": 1}}],
            "stop_reason": "tool_use",
            "usage": {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 20, "cache_creation_input_tokens": 3},
        });
        let (body, usage) = to_chat_completion(answer.to_string().as_bytes(), "public").unwrap();
        let out: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(out["object"], "chat.completion");
        assert_eq!(out["model"], "public");
        assert_eq!(out["choices"][0]["message"]["content"], "Hello");
        assert_eq!(
            out["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
            "{\"a\":1}"
        );
        assert_eq!(out["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(
            usage,
            Usage {
                prompt_tokens: 33,
                completion_tokens: 5,
                cached_tokens: 20,
                estimated: false
            }
        );
        assert_eq!(out["usage"]["prompt_tokens_details"]["cached_tokens"], 20);
    }

    const STREAM: &str = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_9\",\"type\":\"message\",\"role\":\"assistant\",\"usage\":{\"input_tokens\":12,\"output_tokens\":1,\"cache_read_input_tokens\":4}}}\n\nevent: ping\ndata: {\"type\":\"ping\"}\n\nevent: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hel\"}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"lo\"}}\n\nevent: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\nevent: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"tool_use\",\"id\":\"tu_1\",\"name\":\"f\",\"input\":{}}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"a\\\":\"}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"1}\"}}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\"},\"usage\":{\"output_tokens\":7}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";

    fn run(include_usage: bool, chunk: usize) -> (Vec<Value>, bool, StreamTranslator) {
        let mut translator = StreamTranslator::new("public", include_usage);
        let mut out = Vec::new();
        for piece in STREAM.as_bytes().chunks(chunk) {
            out.extend_from_slice(&translator.feed(piece));
        }
        let text = String::from_utf8(out).unwrap();
        let done = text.ends_with("data: [DONE]\n\n");
        let events = text
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .filter(|e| *e != "[DONE]")
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        (events, done, translator)
    }

    #[test]
    fn translates_a_stream_split_at_any_byte() {
        for chunk in [1, 7, 33, 4096] {
            let (events, done, translator) = run(false, chunk);
            assert!(done, "chunk {chunk}");
            assert_eq!(
                events[0]["choices"][0]["delta"],
                json!({"role": "assistant", "content": ""})
            );
            let text: String = events
                .iter()
                .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
                .collect();
            assert_eq!(text, "Hello");
            let tool: Vec<&Value> = events
                .iter()
                .filter_map(|e| e["choices"][0]["delta"]["tool_calls"].get(0))
                .collect();
            assert_eq!(tool[0]["id"], "tu_1");
            assert_eq!(tool[0]["function"]["name"], "f");
            let args: String = tool
                .iter()
                .filter_map(|t| t["function"]["arguments"].as_str())
                .collect();
            assert_eq!(args, "{\"a\":1}");
            assert_eq!(
                events.last().unwrap()["choices"][0]["finish_reason"],
                "tool_calls"
            );
            assert!(
                events.iter().all(|e| e.get("usage").is_none()),
                "no usage unless asked"
            );
            assert_eq!(
                translator.usage(),
                Some(Usage {
                    prompt_tokens: 16,
                    completion_tokens: 7,
                    cached_tokens: 4,
                    estimated: false
                })
            );
        }
    }

    #[test]
    fn adds_the_usage_chunk_when_the_client_asked() {
        let (events, _, _) = run(true, 50);
        let last = events.last().unwrap();
        assert_eq!(last["choices"], json!([]));
        assert_eq!(last["usage"]["prompt_tokens"], 16);
        assert_eq!(last["usage"]["completion_tokens"], 7);
        assert_eq!(last["usage"]["prompt_tokens_details"]["cached_tokens"], 4);
        assert!(events[..events.len() - 1]
            .iter()
            .all(|e| e["usage"].is_null()));
    }

    #[test]
    fn drops_an_endless_line_and_goes_on() {
        let mut translator = StreamTranslator::new("p", false);
        for _ in 0..40 {
            assert!(translator.feed(&[b'x'; 64 * 1024]).is_empty());
            assert!(translator.partial.len() <= crate::cost::MAX_LINE_BYTES + 64 * 1024);
        }
        translator.feed(b"\n\n");
        let out = translator.feed(STREAM.as_bytes());
        assert!(String::from_utf8_lossy(&out).ends_with("data: [DONE]\n\n"));
    }

    #[test]
    fn maps_errors_in_streams_and_answers() {
        let mut translator = StreamTranslator::new("p", false);
        let out = translator.feed(b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n");
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert!(text.starts_with("data: {\"error\""), "{text}");
        assert!(!text.contains("[DONE]"));
        let err = to_openai_error(
            400,
            br#"{"type":"error","error":{"type":"invalid_request_error","message":"bad"}}"#,
        );
        assert_eq!((err.status, &*err.message), (400, "bad"));
        assert_eq!(
            to_openai_error(
                404,
                br#"{"type":"error","error":{"type":"not_found_error","message":"no model"}}"#
            )
            .status,
            404
        );
        assert_eq!(to_openai_error(429, b"{}").status, 429);
        assert_eq!(to_openai_error(529, b"not json").status, 502);
    }
}
