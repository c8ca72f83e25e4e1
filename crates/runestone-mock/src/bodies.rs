//! Response bodies and SSE stream events (pure: no I/O): chat, legacy
//! completions, embeddings, Anthropic messages, and their streamed chunks.

use crate::*;

/// `usage` object.
#[derive(Debug, Serialize)]
pub(crate) struct Usage {
    pub(crate) prompt_tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) completion_tokens: Option<u64>,
    pub(crate) total_tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) prompt_tokens_details: Option<PromptTokensDetails>,
}

/// `usage.prompt_tokens_details`.
#[derive(Debug, Serialize)]
pub(crate) struct PromptTokensDetails {
    pub(crate) cached_tokens: u64,
}

impl Usage {
    /// Usage of a chat completion (with `prompt_tokens_details`).
    pub(crate) fn chat(prompt: u64, completion: u64) -> Self {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: Some(completion),
            total_tokens: prompt + completion,
            prompt_tokens_details: Some(PromptTokensDetails { cached_tokens: 0 }),
        }
    }

    /// Usage of a legacy completion or embeddings request.
    pub(crate) fn plain(prompt: u64, completion: u64) -> Self {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: Some(completion),
            total_tokens: prompt + completion,
            prompt_tokens_details: None,
        }
    }

    /// Usage of an embeddings request (no completion tokens).
    pub(crate) fn embeddings(prompt: u64) -> Self {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: None,
            total_tokens: prompt,
            prompt_tokens_details: None,
        }
    }
}

/// The reply text: `"tok0 tok1 ... tok{n-1}"`.
pub(crate) fn reply_text(start: u64, n: u64) -> String {
    let mut s = String::with_capacity(n.saturating_sub(start) as usize * 7);
    for i in start..n {
        if i > start {
            s.push(' ');
        }
        // writing to a String cannot fail
        let _ = write!(s, "tok{i}");
    }
    s
}

/// Top level of a non-streamed completion, fields in OpenAI's order.
#[derive(Debug, Serialize)]
pub(crate) struct CompletionObject<'a, C> {
    pub(crate) id: &'a str,
    pub(crate) object: &'static str,
    pub(crate) created: u64,
    pub(crate) model: &'a str,
    pub(crate) system_fingerprint: Option<&'a str>,
    pub(crate) choices: [C; 1],
    pub(crate) usage: Usage,
    /// After `usage`, as OpenAI writes it; only when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) service_tier: Option<&'a str>,
}

/// `choices[0]` of a `chat.completion`.
#[derive(Debug, Serialize)]
pub(crate) struct ChatChoice {
    pub(crate) index: u32,
    pub(crate) message: ChatReply,
    pub(crate) logprobs: Option<()>,
    pub(crate) finish_reason: &'static str,
}

/// `choices[0].message` of a `chat.completion`.
#[derive(Debug, Serialize)]
pub(crate) struct ChatReply {
    pub(crate) role: &'static str,
    pub(crate) content: String,
    pub(crate) refusal: Option<()>,
}

/// `choices[0]` of a `text_completion`.
#[derive(Debug, Serialize)]
pub(crate) struct TextChoice {
    pub(crate) text: String,
    pub(crate) index: u32,
    pub(crate) logprobs: Option<()>,
    pub(crate) finish_reason: &'static str,
}

/// Non-streamed `chat.completion` body.
pub(crate) fn chat_completion_body(id: &str, created: u64, model: &str, g: &GenRequest) -> Vec<u8> {
    let v = CompletionObject {
        id,
        object: "chat.completion",
        created,
        model,
        system_fingerprint: None,
        choices: [ChatChoice {
            index: 0,
            message: ChatReply {
                role: "assistant",
                content: reply_text(g.start, g.plan.tokens),
                refusal: None,
            },
            logprobs: None,
            finish_reason: g.plan.finish_reason,
        }],
        usage: Usage::chat(g.prompt_tokens, g.generated()),
        service_tier: g.service_tier.as_deref(),
    };
    serde_json::to_vec(&v).unwrap_or_default()
}

/// Fields of an Anthropic `/v1/messages` request the mock reads.
#[derive(Debug, Deserialize)]
pub(crate) struct MessagesBody {
    #[serde(default)]
    pub(crate) model: Option<String>,
    #[serde(default)]
    pub(crate) messages: Option<Vec<ChatMessage>>,
    #[serde(default)]
    pub(crate) system: Option<Value>,
    #[serde(default)]
    pub(crate) max_tokens: Option<u64>,
    #[serde(default)]
    pub(crate) stream: Option<bool>,
    #[serde(default)]
    pub(crate) tools: Option<Vec<Value>>,
    #[serde(default)]
    pub(crate) mock_tokens: Option<u64>,
}

/// Parses a Messages request; Anthropic requires `max_tokens`.
pub(crate) fn parse_messages(body: &[u8]) -> Result<(GenRequest, Option<String>), ApiError> {
    let b: MessagesBody = serde_json::from_slice(body).map_err(|e| ApiError::from_json(&e))?;
    let Some(max_tokens) = b.max_tokens else {
        return Err(ApiError {
            status: 400,
            message: "max_tokens: Field required".to_owned(),
            kind: "invalid_request_error",
            code: None,
        });
    };
    let messages = b.messages.unwrap_or_default();
    let system = b.system.as_ref().map_or(0, content_bytes);
    let tool = b
        .tools
        .as_ref()
        .and_then(|t| t.first())
        .and_then(|t| t["name"].as_str())
        .map(str::to_owned);
    Ok((
        GenRequest {
            model: b.model,
            prompt_tokens: chat_prompt_tokens(&messages) + bytes_to_tokens(system),
            // max_tokens bounds what is generated, after any prefill.
            plan: plan(
                b.mock_tokens,
                &[Some(max_tokens.saturating_add(prefill_tokens(&messages)))],
            ),
            start: prefill_tokens(&messages),
            prefilled: ends_with_prefill(&messages),
            stream: b.stream.unwrap_or(false),
            include_usage: false,
            service_tier: None,
        },
        tool,
    ))
}

/// Non-streamed Anthropic message: the reply text, or a call of the first
/// tool when tools were sent.
pub(crate) fn messages_body(id: u64, model: &str, g: &GenRequest, tool: Option<&str>) -> Vec<u8> {
    let (content, stop) = match tool {
        Some(name) => (
            json!([{"type": "tool_use", "id": format!("toolu_mock_{id}"), "name": name, "input": {"mock": true}}]),
            "tool_use",
        ),
        None => (
            json!([{"type": "text", "text": reply_text(g.start, g.plan.tokens)}]),
            if g.plan.finish_reason == "length" {
                "max_tokens"
            } else {
                "end_turn"
            },
        ),
    };
    let v = json!({
        "id": format!("msg_mock_{id}"), "type": "message", "role": "assistant", "model": model,
        "content": content, "stop_reason": stop, "stop_sequence": null,
        "usage": {"input_tokens": g.prompt_tokens, "output_tokens": g.generated(),
                  "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0},
    });
    serde_json::to_vec(&v).unwrap_or_default()
}

/// Non-streamed `text_completion` body.
pub(crate) fn text_completion_body(id: &str, created: u64, model: &str, g: &GenRequest) -> Vec<u8> {
    let v = CompletionObject {
        id,
        object: "text_completion",
        created,
        model,
        system_fingerprint: None,
        choices: [TextChoice {
            text: reply_text(g.start, g.plan.tokens),
            index: 0,
            logprobs: None,
            finish_reason: g.plan.finish_reason,
        }],
        usage: Usage::plain(g.prompt_tokens, g.generated()),
        service_tier: None,
    };
    serde_json::to_vec(&v).unwrap_or_default()
}

/// Embeddings response body.
pub(crate) fn embeddings_body(model: &str, e: &EmbeddingsRequest) -> Vec<u8> {
    /// One embedding vector, as floats or base64.
    #[derive(Serialize)]
    #[serde(untagged)]
    enum Vector<'a> {
        Floats(&'a [f32; EMBEDDING_DIMS]),
        Base64(String),
    }
    /// `data[i]`.
    #[derive(Serialize)]
    struct Item<'a> {
        object: &'static str,
        index: usize,
        embedding: Vector<'a>,
    }
    /// The response.
    #[derive(Serialize)]
    struct List<'a> {
        object: &'static str,
        data: Vec<Item<'a>>,
        model: &'a str,
        usage: Usage,
    }
    let data = e
        .vectors
        .iter()
        .enumerate()
        .map(|(index, v)| Item {
            object: "embedding",
            index,
            embedding: if e.base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                Vector::Base64(base64_encode(&bytes))
            } else {
                Vector::Floats(v)
            },
        })
        .collect();
    let v = List {
        object: "list",
        data,
        model,
        usage: Usage::embeddings(e.prompt_tokens),
    };
    serde_json::to_vec(&v).unwrap_or_default()
}

/// One model object.
pub(crate) fn model_json(id: &str) -> Value {
    json!({"id": id, "object": "model", "created": 0, "owned_by": "runestone-mock"})
}

/// CLOCK_MONOTONIC in microseconds: the clock a client on the same machine
/// reads with Python's `time.clock_gettime(time.CLOCK_MONOTONIC)`.
pub(crate) fn monotonic_us() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000)
        .unwrap_or(0)
}

/// Which streaming dialect to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamKind {
    /// `chat.completion.chunk` events.
    Chat,
    /// `text_completion` events.
    Completion,
    /// Anthropic Messages events.
    Anthropic,
    /// Responses API typed events.
    Responses,
}

/// What a Responses API stream's events carry beyond the text.
#[derive(Debug, Clone)]
pub(crate) struct ResponsesStream {
    /// `resp_mock_{id}` and `msg_mock_{id}`.
    pub(crate) id: u64,
    pub(crate) model: String,
    pub(crate) created: u64,
    pub(crate) gen: GenRequest,
    pub(crate) extra: ResponsesExtra,
}

/// Parts shared by every SSE event of one stream.
#[derive(Debug, Clone)]
pub(crate) struct ChunkMeta {
    /// Dialect.
    pub(crate) kind: StreamKind,
    /// `{"id":..,"object":..,"created":..,"model":..,` (JSON, unterminated).
    pub(crate) prefix: String,
    /// `,"usage":null` when `include_usage`, else empty.
    pub(crate) usage_null: &'static str,
    /// Prompt and completion tokens, for Anthropic's usage fields.
    pub(crate) counts: (u64, u64),
    /// An Anthropic stream's start and final delta carry its usage.
    pub(crate) anthropic_usage: bool,
    /// A Responses API stream's identity.
    pub(crate) responses: Option<Box<ResponsesStream>>,
}

impl ChunkMeta {
    /// Builds the shared event prefix.
    pub(crate) fn new(
        kind: StreamKind,
        id: &str,
        created: u64,
        model: &str,
        include_usage: bool,
        service_tier: Option<&str>,
    ) -> Self {
        let object = match kind {
            StreamKind::Chat => "chat.completion.chunk",
            StreamKind::Completion | StreamKind::Anthropic | StreamKind::Responses => {
                "text_completion"
            }
        };
        let quote = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned());
        let mut prefix = format!(
            "{{\"id\":{},\"object\":\"{object}\",\"created\":{created},\"model\":{},",
            quote(id),
            quote(model)
        );
        if kind == StreamKind::Chat {
            prefix.push_str("\"system_fingerprint\":null,");
        }
        if let Some(tier) = service_tier.filter(|_| kind == StreamKind::Chat) {
            let _ = write!(prefix, "\"service_tier\":{},", quote(tier));
        }
        ChunkMeta {
            kind,
            prefix,
            usage_null: if include_usage { ",\"usage\":null" } else { "" },
            counts: (0, 0),
            anthropic_usage: true,
            responses: None,
        }
    }

    /// A Responses API event of this stream: `output` and `usage` as given.
    fn response_snapshot(&self, status: &str, output: Value, usage: Value) -> Value {
        let r = self.responses.as_deref().expect("a Responses stream");
        crate::responses::response_object(
            &format!("resp_mock_{}", r.id),
            r.created,
            &r.model,
            &r.extra,
            status,
            output,
            usage,
        )
    }

    /// One Anthropic SSE event.
    pub(crate) fn anthropic_event(kind: &str, data: &Value) -> String {
        format!("event: {kind}\ndata: {data}\n\n")
    }

    /// An event with one choice. `text` must be JSON-safe (no escaping done).
    pub(crate) fn choice_event(
        &self,
        text: Option<&str>,
        role: bool,
        finish_reason: Option<&str>,
    ) -> String {
        let finish = match finish_reason {
            Some(r) => format!("\"{r}\""),
            None => "null".to_owned(),
        };
        let choice = match self.kind {
            StreamKind::Chat => {
                let delta = match (role, text) {
                    (true, t) => format!(
                        "{{\"role\":\"assistant\",\"content\":\"{}\"}}",
                        t.unwrap_or("")
                    ),
                    (false, Some(t)) => format!("{{\"content\":\"{t}\"}}"),
                    (false, None) => "{}".to_owned(),
                };
                format!("{{\"index\":0,\"delta\":{delta},\"logprobs\":null,\"finish_reason\":{finish}}}")
            }
            StreamKind::Completion | StreamKind::Anthropic | StreamKind::Responses => format!(
                "{{\"text\":\"{}\",\"index\":0,\"logprobs\":null,\"finish_reason\":{finish}}}",
                text.unwrap_or("")
            ),
        };
        format!(
            "data: {}\"choices\":[{choice}]{}}}\n\n",
            self.prefix, self.usage_null
        )
    }

    /// First chat event: role and empty content (Anthropic: message_start
    /// and the text block's start).
    pub(crate) fn role_event(&self) -> String {
        if self.kind == StreamKind::Anthropic {
            let mut start = json!({"type": "message_start", "message": {
                "id": "msg_mock", "type": "message", "role": "assistant", "content": [],
                "model": "mock", "stop_reason": null,
                "usage": {"input_tokens": self.counts.0, "output_tokens": 1,
                          "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}}});
            if !self.anthropic_usage {
                start["message"].as_object_mut().map(|m| m.remove("usage"));
            }
            let block = json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}});
            return Self::anthropic_event("message_start", &start)
                + &Self::anthropic_event("ping", &json!({"type": "ping"}))
                + &Self::anthropic_event("content_block_start", &block);
        }
        if self.kind == StreamKind::Responses {
            let r = self.responses.as_deref().expect("a Responses stream");
            let item = crate::responses::message_item(r.id, "", "in_progress");
            let mut added = item.clone();
            added["content"] = json!([]);
            let created = self.response_snapshot("in_progress", json!([]), Value::Null);
            return [
                responses_event("response.created", json!({"response": created}), 0),
                responses_event("response.in_progress", json!({"response": created}), 1),
                responses_event("response.output_item.added", json!({"output_index": 0, "item": added}), 2),
                responses_event("response.content_part.added", json!({"item_id": format!("msg_mock_{}", r.id),
                    "output_index": 0, "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}}), 3),
            ]
            .concat();
        }
        self.choice_event(Some(""), true, None)
    }

    /// The event carrying token `i` (`"tok{i} "`).
    pub(crate) fn token_event(&self, i: u64) -> String {
        if let Some(r) = self.responses.as_deref() {
            return responses_event(
                "response.output_text.delta",
                json!({"item_id": format!("msg_mock_{}", r.id), "output_index": 0, "content_index": 0,
                       "delta": format!("tok{i} "), "logprobs": []}),
                4 + i - r.gen.start,
            );
        }
        if self.kind == StreamKind::Anthropic {
            let delta = json!({"type": "content_block_delta", "index": 0,
                               "delta": {"type": "text_delta", "text": format!("tok{i} ")}});
            return Self::anthropic_event("content_block_delta", &delta);
        }
        self.choice_event(Some(&format!("tok{i} ")), false, None)
    }

    /// The provider's in-band error event, in the stream's dialect: the
    /// server overloaded, or the error `code` names (Anthropic's error
    /// type; an OpenAI error of the request's).
    pub(crate) fn error_event(&self, code: Option<&str>) -> String {
        let message = match code {
            None => "The server is overloaded.".to_owned(),
            Some(code) => format!("The provider refused the request: {code}."),
        };
        match self.kind {
            StreamKind::Anthropic => Self::anthropic_event(
                "error",
                &json!({"type": "error", "error": {"type": code.unwrap_or("overloaded_error"), "message": message}}),
            ),
            StreamKind::Responses => format!(
                "event: error\ndata: {}\n\n",
                json!({"type": "error", "code": code.unwrap_or("server_error"), "message": message, "param": null})
            ),
            StreamKind::Chat | StreamKind::Completion => {
                let (kind, code) = match code {
                    None => ("server_error", None),
                    Some(code) => ("invalid_request_error", Some(code)),
                };
                format!(
                    "data: {}\n\n",
                    json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
                )
            }
        }
    }

    /// The end of the stream (`[DONE]`, or Anthropic's message_stop).
    pub(crate) fn done_event(&self) -> String {
        if self.kind == StreamKind::Responses {
            return String::new();
        }
        if self.kind == StreamKind::Anthropic {
            return Self::anthropic_event("message_stop", &json!({"type": "message_stop"}));
        }
        DONE_EVENT.to_owned()
    }

    /// The event carrying `finish_reason` (empty delta / text).
    pub(crate) fn finish_event(&self, finish_reason: &str) -> String {
        if let Some(r) = self.responses.as_deref() {
            let text = reply_text(r.gen.start, r.gen.plan.tokens);
            let item_id = format!("msg_mock_{}", r.id);
            let item = crate::responses::message_item(r.id, &text, "completed");
            let n = 4 + r.gen.generated();
            let usage = crate::responses::responses_usage(self.counts.0, self.counts.1);
            let (status, kind) = if finish_reason == "length" {
                ("incomplete", "response.incomplete")
            } else {
                ("completed", "response.completed")
            };
            let mut response = self.response_snapshot(status, json!([item]), usage);
            if status == "incomplete" {
                response["incomplete_details"] = json!({"reason": "max_output_tokens"});
            }
            return [
                responses_event("response.output_text.done", json!({"item_id": item_id, "output_index": 0,
                    "content_index": 0, "text": text, "logprobs": []}), n),
                responses_event("response.content_part.done", json!({"item_id": item_id, "output_index": 0,
                    "content_index": 0, "part": {"type": "output_text", "text": text, "annotations": []}}), n + 1),
                responses_event("response.output_item.done", json!({"output_index": 0, "item": item}), n + 2),
                responses_event(kind, json!({"response": response}), n + 3),
            ]
            .concat();
        }
        match self.kind {
            StreamKind::Chat => self.choice_event(None, false, Some(finish_reason)),
            StreamKind::Completion | StreamKind::Responses => {
                self.choice_event(Some(""), false, Some(finish_reason))
            }
            StreamKind::Anthropic => {
                let stop = if finish_reason == "length" {
                    "max_tokens"
                } else {
                    "end_turn"
                };
                Self::anthropic_event(
                    "content_block_stop",
                    &json!({"type": "content_block_stop", "index": 0}),
                ) + &Self::anthropic_event("message_delta", &{
                    let mut delta = json!({"type": "message_delta",
                        "delta": {"stop_reason": stop, "stop_sequence": null}});
                    if self.anthropic_usage {
                        delta["usage"] = json!({"output_tokens": self.counts.1});
                    }
                    delta
                })
            }
        }
    }

    /// The final `"choices": []` event with usage.
    pub(crate) fn usage_event(&self, prompt: u64, completion: u64) -> String {
        let usage = match self.kind {
            StreamKind::Chat => Usage::chat(prompt, completion),
            StreamKind::Responses => return String::new(),
            StreamKind::Completion | StreamKind::Anthropic => Usage::plain(prompt, completion),
        };
        format!(
            "data: {}\"choices\":[],\"usage\":{}}}\n\n",
            self.prefix,
            serde_json::to_string(&usage).unwrap_or_default()
        )
    }
}

/// The stream terminator.
pub(crate) const DONE_EVENT: &str = "data: [DONE]\n\n";

/// A streamed Messages answer that calls `tool` with `{"mock": true}`
/// (its input in two `input_json_delta` pieces), as Anthropic streams one.
pub(crate) fn messages_tool_stream(id: u64, tool: &str, prompt_tokens: u64) -> String {
    let event = ChunkMeta::anthropic_event;
    [
        event("message_start", &json!({"type": "message_start", "message": {
            "id": format!("msg_mock_{id}"), "type": "message", "role": "assistant", "content": [],
            "model": "mock", "stop_reason": null,
            "usage": {"input_tokens": prompt_tokens, "output_tokens": 1}}})),
        event("content_block_start", &json!({"type": "content_block_start", "index": 0,
            "content_block": {"type": "tool_use", "id": format!("toolu_mock_{id}"), "name": tool, "input": {}}})),
        event("content_block_delta", &json!({"type": "content_block_delta", "index": 0,
            "delta": {"type": "input_json_delta", "partial_json": "{\"mock\":"}})),
        event("content_block_delta", &json!({"type": "content_block_delta", "index": 0,
            "delta": {"type": "input_json_delta", "partial_json": " true}"}})),
        event("content_block_stop", &json!({"type": "content_block_stop", "index": 0})),
        event("message_delta", &json!({"type": "message_delta",
            "delta": {"stop_reason": "tool_use", "stop_sequence": null}, "usage": {"output_tokens": 5}})),
        event("message_stop", &json!({"type": "message_stop"})),
    ]
    .concat()
}
