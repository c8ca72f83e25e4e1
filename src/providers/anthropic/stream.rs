//! A Messages API event stream as OpenAI `chat.completion.chunk`s, event by
//! event, never buffering more than a partial line.

use super::answer::{
    counted, finish_reason, prompt_of, reported_tier, to_openai_error, unix_now, usage_json,
    usage_of,
};
use super::request::STRUCTURED_TOOL;
use crate::cost::{line_end, rest_of_line_end, Estimate, ServiceTier, Usage, SAMPLE_BYTES};
use bytes::{Buf, Bytes, BytesMut};
use serde_json::{json, Value};

/// Translates an Anthropic SSE stream into OpenAI `chat.completion.chunk`
/// events as it arrives.
#[derive(Debug)]
pub struct StreamTranslator {
    pub(super) partial: BytesMut,
    /// The last line ended at a `\r` that ended its read (a `\n` that
    /// starts the next is the rest of its line end).
    after_cr: bool,
    event: Option<String>,
    id: String,
    public_model: String,
    created: u64,
    include_usage: bool,
    usage: Usage,
    /// The tier the stream's usage reports said it was served at.
    tier: Option<ServiceTier>,
    saw_usage: bool,
    /// The provider reported usage the gateway cannot bill by (see
    /// `usage_of`): none of it is, and the gateway counts.
    untrusted: bool,
    /// The prompt's counts came (with the stream's start, or a delta).
    prompt_known: bool,
    tool_index: std::collections::HashMap<u64, usize>,
    /// The content block of a JSON response_format's forced tool: its
    /// input is streamed as the answer's content.
    structured: Option<u64>,
    finished: bool,
    /// It ended with its answer (`message_stop`, sent on as `[DONE]`).
    stopped: bool,
    /// The final delta (with the stop reason) went by: `message_stop` is next.
    delta_seen: bool,
    generated_bytes: u64,
    /// The generated text seen, up to [`SAMPLE_BYTES`], to count it by
    /// when the provider reports no usage; how many bytes it holds.
    sample: String,
    /// Counting: the request's estimate and the encoding's model (without
    /// one, bytes / 4).
    estimate: Option<(Estimate, String)>,
    /// The count of a stopped stream (its usage chunk's, then its bill's).
    counted: std::sync::OnceLock<Usage>,
    /// The data lines of an event whose payload is split over several (the
    /// SSE format joins them with line ends), until its blank line.
    data: String,
    /// The stream was cut at an event too long to hold.
    cut: bool,
    /// Events dropped because their payload was not JSON.
    malformed: u32,
    /// The provider's `error` event, as the client's error.
    error: Option<Box<crate::openai::ApiError>>,
}

/// Whether `value` is a Messages stream event (by its `type`), not a value
/// inside one.
fn is_event(value: &Value) -> bool {
    matches!(
        value["type"].as_str(),
        Some(
            "message_start"
                | "content_block_start"
                | "content_block_delta"
                | "content_block_stop"
                | "message_delta"
                | "message_stop"
                | "ping"
                | "error"
        )
    )
}

impl StreamTranslator {
    /// A translator answering as `public_model`; `include_usage` when the
    /// client asked for a final usage chunk.
    pub fn new(public_model: &str, include_usage: bool) -> Self {
        StreamTranslator {
            partial: BytesMut::new(),
            after_cr: false,
            event: None,
            id: String::new(),
            public_model: public_model.to_string(),
            created: unix_now(),
            include_usage,
            usage: Usage::default(),
            saw_usage: false,
            untrusted: false,
            prompt_known: false,
            tool_index: Default::default(),
            structured: None,
            finished: false,
            stopped: false,
            delta_seen: false,
            generated_bytes: 0,
            sample: String::new(),
            estimate: None,
            counted: std::sync::OnceLock::new(),
            tier: None,
            data: String::new(),
            cut: false,
            malformed: 0,
            error: None,
        }
    }

    /// Counts with `estimate` (as `model`'s encoding does) what the
    /// provider does not report, for the bill and the client's usage chunk.
    pub fn with_estimate(mut self, estimate: Estimate, model: &str) -> Self {
        self.estimate = Some((estimate, model.to_owned()));
        self
    }

    /// Usage reported so far (cache tokens included), if any.
    pub fn usage(&self) -> Option<Usage> {
        (self.saw_usage && !self.untrusted).then_some(Usage {
            tier: self.tier,
            ..self.usage
        })
    }

    /// What the answer used: the provider's report when it gave a usable
    /// one, else the gateway's count of the text generated so far (with
    /// the prompt's reported counts, when those came and were usable).
    /// The client's usage chunk carries the same figures.
    pub fn billed_usage(&self) -> Usage {
        if let Some(usage) = self.usage() {
            return usage;
        }
        if self.stopped {
            // Nothing comes after: counted once for the chunk and the bill.
            return *self.counted.get_or_init(|| self.count());
        }
        self.count()
    }

    /// The gateway's count (see [`StreamTranslator::billed_usage`]).
    fn count(&self) -> Usage {
        let unsampled = self
            .generated_bytes
            .saturating_sub(self.sample.len() as u64);
        let reported_prompt = (self.prompt_known && !self.untrusted).then_some(&self.usage);
        let estimate = self.estimate.as_ref().map(|(e, model)| (e, model.as_str()));
        Usage {
            tier: self.tier,
            ..counted(reported_prompt, estimate, &self.sample, unsampled)
        }
    }

    /// Whether the client's usage chunk may come with `chunk` and the
    /// gateway may have to count for it: its encoding should be loaded
    /// first. After the final delta, or when `chunk` names the stream's end.
    pub fn may_count_for_client(&self, chunk: &[u8]) -> bool {
        self.include_usage
            && !self.stopped
            && self.usage().is_none()
            && (self.delta_seen || memchr::memmem::find(chunk, b"message_stop").is_some())
    }

    /// Whether the stream ended properly (`message_stop` or an error event).
    pub fn finished(&self) -> bool {
        self.finished
    }

    /// Whether the stream ended with its answer (`message_stop`), not an
    /// error event.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Takes one upstream chunk; returns the OpenAI events it completes.
    ///
    /// An event is translated as soon as its `data:` line is JSON; a
    /// payload split over several lines, when its blank line comes. An
    /// event that grows past [`crate::cost::MAX_LINE_BYTES`] before it
    /// ends is not held: the stream is cut there ([`StreamTranslator::cut`])
    /// and its bytes are counted as generated.
    pub fn feed(&mut self, chunk: &[u8]) -> Bytes {
        if self.stopped || self.cut || self.error.is_some() {
            // Nothing after `message_stop`, an error or an oversized event
            // is translated.
            return Bytes::new();
        }
        // Bytes already in `partial` hold no line end (a long line that
        // trickles in is not scanned again and again).
        let mut scan_from = self.partial.len();
        self.partial.extend_from_slice(chunk);
        let rest_of_line_end = rest_of_line_end(&mut self.after_cr, &self.partial);
        self.partial.advance(rest_of_line_end);
        let mut out = BytesMut::new();
        // Lines end as SSE ends them (`\n`, `\r\n` or a lone `\r`).
        while let Some(end) = line_end(&self.partial[scan_from..]) {
            if self.stopped || self.error.is_some() {
                self.partial.clear();
                break;
            }
            self.after_cr = end.cr_last;
            // Its bytes without its line end, as an unended one's below
            // (a `\r\n` split between reads ends it at the `\r`).
            let content = scan_from + end.at;
            let line = self.partial.split_to(scan_from + end.next);
            scan_from = 0;
            if content + self.data.len() > crate::cost::MAX_LINE_BYTES {
                // Whole in one chunk (a decoded one may be megabytes), but
                // over the bound all the same: not parsed.
                self.generated_bytes += line.len() as u64;
                // What follows it is not read (nor billed as generated).
                self.partial.clear();
                self.cut_oversized(&mut out);
                break;
            }
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\r', '\n']);
            if let Some(event) = line.strip_prefix("event:") {
                self.event = Some(event.trim().to_string());
            } else if let Some(data) = line.strip_prefix("data:") {
                let data = data.trim();
                match serde_json::from_str::<Value>(data) {
                    // The common case: the payload on one line.
                    Ok(value) if self.data.is_empty() => self.dispatch(&value, &mut out),
                    // An event of its own after a payload that never
                    // parsed and had no blank line to end it: that one
                    // is dropped, this one is not.
                    Ok(value) if is_event(&value) => {
                        self.data.clear();
                        self.malformed += 1;
                        self.dispatch(&value, &mut out);
                    }
                    _ => {
                        if !self.data.is_empty() {
                            self.data.push('\n');
                        }
                        self.data.push_str(data);
                    }
                }
            } else if line.is_empty() {
                if !self.data.is_empty() {
                    let data = std::mem::take(&mut self.data);
                    match serde_json::from_str::<Value>(&data) {
                        Ok(value) => self.dispatch(&value, &mut out),
                        Err(_) => self.malformed += 1,
                    }
                }
                self.event = None;
            }
        }
        if !self.cut && self.partial.len() + self.data.len() > crate::cost::MAX_LINE_BYTES {
            self.cut_oversized(&mut out);
        }
        out.freeze()
    }

    /// The end of the provider's body: a last line without its line end,
    /// or an event without its blank line, is read as if it had them.
    pub fn finish(&mut self) -> Bytes {
        if self.partial.is_empty() && self.data.is_empty() {
            return Bytes::new();
        }
        self.feed(b"\n\n")
    }

    /// Translates one event's payload, its type named in it or by its
    /// `event:` line.
    fn dispatch(&mut self, value: &Value, out: &mut BytesMut) {
        let kind = value["type"]
            .as_str()
            .map(str::to_string)
            .or_else(|| self.event.clone());
        self.translate(kind.as_deref().unwrap_or_default(), value, out);
    }

    /// Stops at an event too long to hold: its bytes so far are counted as
    /// generated, and nothing more is read ([`StreamTranslator::cut`]).
    /// After the final delta the answer is whole: it ends there, as at
    /// `message_stop`, and the event is neither read nor billed.
    fn cut_oversized(&mut self, out: &mut BytesMut) {
        if self.delta_seen {
            self.partial.clear();
            self.data.clear();
            self.translate("message_stop", &Value::Null, out);
            return;
        }
        self.generated_bytes += (self.partial.len() + self.data.len()) as u64;
        self.partial.clear();
        self.data.clear();
        self.cut = true;
    }

    /// The error the provider's `error` event ended the stream with.
    pub fn error(&self) -> Option<&crate::openai::ApiError> {
        self.error.as_deref()
    }

    /// How many events were dropped because their payload (one line, or
    /// several joined) was not JSON.
    pub fn malformed(&self) -> u32 {
        self.malformed
    }

    /// Whether the stream was cut at an event longer than
    /// [`crate::cost::MAX_LINE_BYTES`]: its text cannot reach the client,
    /// so the answer is broken off there, as a provider's break is (it
    /// fails over or resumes elsewhere when it can).
    pub fn cut(&self) -> bool {
        self.cut
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
                    // The prompt's counts; the completion's come with the
                    // final delta (`output_tokens` here is a placeholder,
                    // so one left out does not discredit the rest).
                    match prompt_of(&message["usage"]) {
                        Some(usage) => {
                            self.usage = usage;
                            self.prompt_known = true;
                        }
                        None => self.untrusted = true,
                    }
                    // Kept for the gateway's count too, should the
                    // stream break or its counts be unusable.
                    self.tier = message["usage"].as_object().and_then(reported_tier);
                }
                // Content is null until some comes: a tool-only answer keeps it so.
                let chunk = self.chunk(json!({"role": "assistant", "content": null}), None);
                Self::emit(out, &chunk);
            }
            "content_block_start" => {
                let block = &event["content_block"];
                if block["type"] == "tool_use" && block["name"] == STRUCTURED_TOOL {
                    self.structured = event["index"].as_u64();
                } else if block["type"] == "tool_use" {
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
                // What the model generated, to count when the provider
                // reports no usage: thinking is billed as output, though the
                // chat format has no place for it.
                let piece = match delta["type"].as_str() {
                    Some("text_delta") => delta["text"].as_str(),
                    Some("input_json_delta") => delta["partial_json"].as_str(),
                    Some("thinking_delta") => delta["thinking"].as_str(),
                    _ => None,
                }
                .unwrap_or_default();
                self.generated_bytes += piece.len() as u64;
                if self.sample.len() < SAMPLE_BYTES {
                    self.sample.push_str(piece);
                }
                let openai = match delta["type"].as_str() {
                    Some("text_delta") => json!({"content": delta["text"]}),
                    Some("input_json_delta") if event["index"].as_u64() == self.structured => {
                        json!({"content": delta["partial_json"]})
                    }
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
                self.delta_seen = true;
                if event["usage"].is_object() {
                    match usage_of(&event["usage"], false) {
                        Some(update) => {
                            self.usage.completion_tokens = update.completion_tokens;
                            self.tier = update.tier.or(self.tier);
                            if update.prompt_tokens > 0 {
                                self.usage.prompt_tokens = update.prompt_tokens;
                                self.usage.cached_tokens = update.cached_tokens;
                                self.prompt_known = true;
                            }
                            // Both halves known: the provider's report.
                            self.saw_usage = self.prompt_known;
                        }
                        None => self.untrusted = true,
                    }
                }
                let finish = match finish_reason(event["delta"]["stop_reason"].as_str()) {
                    Some("tool_calls") if self.structured.is_some() => "stop",
                    other => other.unwrap_or("stop"),
                };
                let chunk = self.chunk(json!({}), Some(finish));
                Self::emit(out, &chunk);
            }
            "message_stop" => {
                self.finished = true;
                self.stopped = true;
                if self.include_usage {
                    let chunk = json!({
                        "id": self.id,
                        "object": "chat.completion.chunk",
                        "created": self.created,
                        "model": self.public_model,
                        "choices": [],
                        "usage": usage_json(&self.billed_usage()),
                    });
                    Self::emit(out, &chunk);
                }
                out.extend_from_slice(b"data: [DONE]\n\n");
            }
            "error" => {
                let status = match event["error"]["type"].as_str() {
                    Some("overloaded_error") => 529,
                    _ => crate::openai::error_status(&event["error"]),
                };
                let mut error = to_openai_error(status, event.to_string().as_bytes());
                // A refused key keeps its status: it says nothing of the
                // deployment's health, as a 401 or 403 answer does not.
                if matches!(status, 401 | 403) {
                    error.status = status;
                }
                out.extend_from_slice(&error.sse_event());
                self.error = Some(Box::new(error));
                self.finished = true;
            }
            _ => {} // ping, content_block_stop
        }
    }
}
