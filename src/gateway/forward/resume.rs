//! Streams that survive their provider: a chat completion stream that
//! breaks after content reached the client is continued on the next
//! deployment and spliced into the same client stream.
//!
//! [`Resumable`] stands between the forwarder and the client. While the
//! first attempt streams, it records what the client was sent: the chunks'
//! `id`, `created` and `model`, and the text of choice 0. When that stream
//! breaks (cut, stalled), the forwarder asks the next deployment for the
//! rest: with the text delivered so far as a trailing assistant message (a
//! prefill) where the provider continues one, else the original request
//! again. The continuation's chunks are rewritten on their way out: the
//! first attempt's `id`, `created` and `model`; no second role event; the
//! text the client already has skipped when the answer was restarted from
//! the beginning (a restart that says something else fails the stream); the
//! usage chunk summing every attempt. The client sees one stream with one
//! `finish_reason`, one usage chunk and one `[DONE]`.
//!
//! Only streams it can finish faithfully are resumed: none after a tool
//! call, a second choice (`n > 1`), a `finish_reason`, or an event it cannot
//! read.

use crate::cost::{Usage, MAX_LINE_BYTES};
use crate::gateway::client::Client;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use pingora::http::ResponseHeader;
use serde_json::{json, Map, Value};

/// The client end of a forwarded request whose stream may be resumed.
pub(crate) struct Resumable<'c> {
    inner: &'c mut dyn Client,
    /// The request may be resumed at all (a chat stream, the model allows
    /// it).
    enabled: bool,
    /// The response header went to the client.
    started: bool,
    /// A line not yet complete.
    partial: BytesMut,
    /// How much of `partial` is known to hold no line end.
    scanned: usize,
    /// A line too long to hold went by: everything passes through as it
    /// is, and the stream can no longer be resumed.
    passthrough: bool,
    /// Skip the blank line after a dropped event.
    skip_blank_line: bool,
    /// What the client has ends with a whole event.
    at_boundary: bool,
    /// End the client's unfinished event before sending more.
    close_event: bool,
    record: Record,
    /// Rewriting a continuation, from the second attempt that streams on.
    splice: Option<Splice>,
}

/// What the client was sent, as far as resuming needs.
#[derive(Debug, Default)]
struct Record {
    id: Option<Value>,
    created: Option<Value>,
    model: Option<Value>,
    /// Choice 0's text so far.
    text: String,
    /// Something went by that a continuation could not follow.
    final_: bool,
    /// The stream's `[DONE]` went by.
    done: bool,
}

/// How a continuation is rewritten.
#[derive(Debug)]
struct Splice {
    /// Text the continuation repeats, to skip.
    skip: String,
    /// A repeat that differs from `skip` fails the stream (a restart must
    /// say what the client already has); else skipping just stops.
    strict: bool,
    /// What earlier attempts used, added to the usage chunk.
    earlier: Usage,
    /// The continuation said something else than the client already has.
    diverged: bool,
}

/// How a continuation asks for the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Continuation {
    /// The text delivered, as a trailing assistant message.
    Prefill(String),
    /// The original request again; the delivered text is skipped.
    Restart,
}

impl<'c> Resumable<'c> {
    /// Wraps `inner`; `enabled` when this request's stream may be resumed.
    pub(crate) fn new(inner: &'c mut dyn Client, enabled: bool) -> Self {
        Resumable {
            inner,
            enabled,
            started: false,
            partial: BytesMut::new(),
            scanned: 0,
            passthrough: false,
            skip_blank_line: false,
            at_boundary: true,
            close_event: false,
            record: Record::default(),
            splice: None,
        }
    }

    /// Whether the response header went to the client (no other answer can
    /// be given now).
    pub(crate) fn started(&self) -> bool {
        self.started
    }

    /// Whether a continuation diverged from what the client already has.
    pub(crate) fn diverged(&self) -> bool {
        self.splice.as_ref().is_some_and(|s| s.diverged)
    }

    /// How the next attempt asks for the rest of the stream: a prefill when
    /// the provider continues one (`prefill`), else a restart.
    pub(crate) fn continue_with(&mut self, prefill: bool, earlier: Usage) -> Continuation {
        // A prefill may not end in whitespace (Anthropic refuses one that
        // does); the continuation repeats it, and it is skipped.
        let text = &self.record.text;
        let kept = text.trim_end();
        let (continuation, skip, strict) = if prefill && !kept.is_empty() {
            (
                Continuation::Prefill(kept.to_owned()),
                text[kept.len()..].to_owned(),
                false,
            )
        } else {
            (Continuation::Restart, text.clone(), true)
        };
        // A line cut short is dropped (it was never sent); an event the
        // client has not seen the end of is ended first.
        self.partial.clear();
        self.scanned = 0;
        self.skip_blank_line = false;
        self.close_event = !self.at_boundary;
        self.splice = Some(Splice {
            skip,
            strict,
            earlier,
            diverged: false,
        });
        continuation
    }

    /// Ends the client's stream with an in-band error event (no `[DONE]`
    /// follows, so SDKs raise).
    pub(crate) async fn fail(&mut self, event: Bytes) {
        // A line cut short is dropped (it was never sent); an event the
        // client has not seen the end of is ended first.
        self.partial.clear();
        let mut out = BytesMut::new();
        if !self.at_boundary {
            out.extend_from_slice(b"\n");
        }
        out.extend_from_slice(&event);
        self.inner.send_body(out.freeze(), true).await;
    }

    /// Whether the client got the whole stream (its `[DONE]`).
    pub(crate) fn completed(&self) -> bool {
        self.record.done
    }

    /// Records and (for a continuation) rewrites the complete lines of
    /// `bytes`; returns what to send.
    fn process(&mut self, bytes: &[u8], end: bool) -> Bytes {
        if self.passthrough {
            return Bytes::copy_from_slice(bytes);
        }
        self.partial.extend_from_slice(bytes);
        // Bytes already scanned hold no line end.
        let complete = match memchr::memrchr(b'\n', &self.partial[self.scanned..]) {
            Some(last) => self.partial.split_to(self.scanned + last + 1),
            None if end => std::mem::take(&mut self.partial),
            None if self.partial.len() > MAX_LINE_BYTES => {
                // Too long to hold: passed on unread from here on.
                self.passthrough = true;
                self.record.final_ = true;
                return std::mem::take(&mut self.partial).freeze();
            }
            None => {
                self.scanned = self.partial.len();
                return Bytes::new();
            }
        };
        self.scanned = 0;
        let mut out = BytesMut::with_capacity(complete.len());
        for line in complete.split_inclusive(|&b| b == b'\n') {
            self.line(line, &mut out);
        }
        if end && !self.partial.is_empty() {
            let rest = std::mem::take(&mut self.partial);
            self.line(&rest, &mut out);
        }
        out.freeze()
    }

    /// One line of the stream.
    fn line(&mut self, line: &[u8], out: &mut BytesMut) {
        let body = line.strip_suffix(b"\n").unwrap_or(line);
        let body = body.strip_suffix(b"\r").unwrap_or(body);
        if body.is_empty() {
            if !std::mem::take(&mut self.skip_blank_line) {
                out.extend_from_slice(line);
            }
            return;
        }
        let Some(payload) = body.strip_prefix(b"data:") else {
            out.extend_from_slice(line);
            return;
        };
        let payload = payload.trim_ascii();
        if payload == b"[DONE]" {
            if let Some(splice) = &mut self.splice {
                if splice.strict && !splice.skip.is_empty() {
                    // The restart ended before repeating all the client has.
                    splice.diverged = true;
                    return;
                }
            }
            self.record.final_ = true;
            self.record.done = true;
            out.extend_from_slice(line);
            return;
        }
        let Ok(Value::Object(mut event)) = serde_json::from_slice::<Value>(payload) else {
            self.record.final_ = true;
            out.extend_from_slice(line);
            return;
        };
        if let Some(splice) = &mut self.splice {
            if !splice.rewrite(&mut event, &self.record) {
                self.skip_blank_line = true;
                return;
            }
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(&serde_json::to_vec(&event).unwrap_or_default());
            out.extend_from_slice(b"\n");
        } else {
            out.extend_from_slice(line);
        }
        self.record.observe(&event);
    }
}

impl Record {
    /// Takes note of an event the client was sent.
    fn observe(&mut self, event: &Map<String, Value>) {
        for (field, slot) in [
            ("id", &mut self.id),
            ("created", &mut self.created),
            ("model", &mut self.model),
        ] {
            if slot.is_none() {
                *slot = event.get(field).cloned();
            }
        }
        if event.contains_key("error") {
            self.final_ = true;
        }
        let Some(choices) = event.get("choices").and_then(Value::as_array) else {
            return;
        };
        for choice in choices {
            let index = choice.get("index").and_then(Value::as_u64).unwrap_or(0);
            let delta = &choice["delta"];
            let present = |v: &Value| !v.is_null();
            if index != 0
                || present(&choice["finish_reason"])
                || present(&delta["tool_calls"])
                || present(&delta["function_call"])
                || delta["refusal"].as_str().is_some_and(|r| !r.is_empty())
            {
                self.final_ = true;
            }
            if let Some(text) = delta["content"].as_str() {
                self.text.push_str(text);
            }
        }
    }
}

impl Splice {
    /// Rewrites one continuation event; false when it is left out (it
    /// carries nothing the client does not have).
    fn rewrite(&mut self, event: &mut Map<String, Value>, record: &Record) -> bool {
        if self.diverged {
            return false;
        }
        for (field, value) in [
            ("id", &record.id),
            ("created", &record.created),
            ("model", &record.model),
        ] {
            if let (Some(value), Some(slot)) = (value, event.get_mut(field)) {
                *slot = value.clone();
            }
        }
        if let Some(usage) = event.get_mut("usage").filter(|u| u.is_object()) {
            self.add_earlier(usage);
        }
        let mut carries = event.get("usage").is_some_and(|u| !u.is_null());
        let Some(choices) = event.get_mut("choices").and_then(Value::as_array_mut) else {
            return true;
        };
        for choice in choices.iter_mut() {
            if !choice["finish_reason"].is_null() {
                carries = true;
            }
            let Some(delta) = choice.get_mut("delta").and_then(Value::as_object_mut) else {
                carries = true;
                continue;
            };
            delta.remove("role");
            // The client saw the first attempt's reasoning; another model's
            // would only be a second, different one.
            delta.remove("reasoning_content");
            delta.remove("reasoning");
            if let Some(Value::String(text)) = delta.get_mut("content") {
                self.skip_repeat(text);
                if self.diverged {
                    return false;
                }
                if text.is_empty() {
                    delta.remove("content");
                }
            }
            if !delta.is_empty() {
                carries = true;
            }
        }
        carries
    }

    /// Takes the repeated part off the front of `text`.
    fn skip_repeat(&mut self, text: &mut String) {
        if self.skip.is_empty() {
            return;
        }
        let common = self
            .skip
            .char_indices()
            .zip(text.chars())
            .take_while(|((_, a), b)| a == b)
            .last()
            .map_or(0, |((i, a), _)| i + a.len_utf8());
        if common == self.skip.len() {
            self.skip.clear();
            text.drain(..common);
        } else if common == text.len() {
            self.skip.drain(..common);
            text.clear();
        } else if self.strict {
            self.diverged = true;
        } else {
            self.skip.clear();
            text.drain(..common);
        }
    }

    /// Adds what earlier attempts used to a usage object.
    fn add_earlier(&self, usage: &mut Value) {
        let earlier = self.earlier;
        for (field, add) in [
            ("prompt_tokens", earlier.prompt_tokens),
            ("completion_tokens", earlier.completion_tokens),
            ("total_tokens", earlier.total()),
        ] {
            if let Some(n) = usage.get(field).and_then(Value::as_u64) {
                usage[field] = json!(n.saturating_add(add));
            }
        }
        // get_mut, not indexing: a provider's odd shape must not panic.
        if let Some(cached) = usage
            .get_mut("prompt_tokens_details")
            .and_then(|d| d.get_mut("cached_tokens"))
        {
            if let Some(n) = cached.as_u64() {
                *cached = json!(n.saturating_add(earlier.cached_tokens));
            }
        }
    }
}

/// The request body with `text` as a trailing assistant message to
/// continue, and its token limit lowered by what was delivered already;
/// `None` when the body is not a chat request.
pub(crate) fn with_prefill(body: &[u8], text: &str, delivered_tokens: u64) -> Option<Bytes> {
    let mut request: Map<String, Value> = serde_json::from_slice(body).ok()?;
    request
        .get_mut("messages")?
        .as_array_mut()?
        .push(json!({"role": "assistant", "content": text}));
    for field in ["max_tokens", "max_completion_tokens"] {
        if let Some(limit) = request.get(field).and_then(Value::as_u64) {
            request.insert(
                field.to_owned(),
                json!(limit.saturating_sub(delivered_tokens).max(1)),
            );
        }
    }
    serde_json::to_vec(&request).ok().map(Bytes::from)
}

// The methods that send or wait hand on the inner client's future instead
// of being `async fn`s: those would box a second future around it on every
// call (a few a request, more for a stream).
#[async_trait]
impl Client for Resumable<'_> {
    fn request_headers(&self) -> &http::HeaderMap {
        self.inner.request_headers()
    }

    fn send_header<'a, 'f>(&'a mut self, header: ResponseHeader) -> BoxFuture<'f, bool>
    where
        'a: 'f,
        Self: 'f,
    {
        // A continuation's header is the client's already.
        if std::mem::replace(&mut self.started, true) {
            return Box::pin(std::future::ready(true));
        }
        self.inner.send_header(header)
    }

    fn send_body<'a, 'f>(&'a mut self, body: Bytes, end: bool) -> BoxFuture<'f, bool>
    where
        'a: 'f,
        Self: 'f,
    {
        if !self.enabled {
            return self.inner.send_body(body, end);
        }
        let mut out = self.process(&body, end);
        if self.diverged() {
            // Nothing more of this attempt goes out; like a client gone,
            // it ends the copy, and the forwarder ends the stream.
            return Box::pin(std::future::ready(false));
        }
        if out.is_empty() && !end {
            return Box::pin(std::future::ready(true));
        }
        if !out.is_empty() {
            if std::mem::take(&mut self.close_event) {
                out = Bytes::from([&b"\n"[..], &out[..]].concat());
            }
            self.at_boundary = out.ends_with(b"\n\n") || out.ends_with(b"\n\r\n");
        }
        self.inner.send_body(out, end)
    }

    fn gone<'a, 'f>(&'a mut self) -> BoxFuture<'f, ()>
    where
        'a: 'f,
        Self: 'f,
    {
        self.inner.gone()
    }

    fn abort<'a, 'f>(&'a mut self) -> BoxFuture<'f, ()>
    where
        'a: 'f,
        Self: 'f,
    {
        self.inner.abort()
    }

    fn resumable(&self) -> bool {
        self.enabled && self.started && !self.record.final_ && !self.diverged()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::client::Collected;

    fn block_on<F: std::future::Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(future)
    }

    fn chunk(id: &str, content: Option<&str>, role: bool, finish: Option<&str>) -> String {
        let mut delta = Map::new();
        if role {
            delta.insert("role".into(), json!("assistant"));
        }
        if let Some(c) = content {
            delta.insert("content".into(), json!(c));
        }
        let event = json!({"id": id, "object": "chat.completion.chunk", "created": 7,
            "model": id, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        format!("data: {event}\n\n")
    }

    fn run(client: &mut Resumable<'_>, events: &[String]) {
        let body = events.concat();
        block_on(client.send_body(Bytes::from(body), false));
    }

    fn texts(body: &[u8]) -> (String, Vec<Value>) {
        let mut text = String::new();
        let mut events = Vec::new();
        for line in body.split(|&b| b == b'\n') {
            let Some(payload) = line.strip_prefix(b"data: ") else {
                continue;
            };
            if payload == b"[DONE]" {
                events.push(json!("[DONE]"));
                continue;
            }
            let event: Value = serde_json::from_slice(payload).unwrap();
            if let Some(t) = event["choices"][0]["delta"]["content"].as_str() {
                text.push_str(t);
            }
            events.push(event);
        }
        (text, events)
    }

    #[test]
    fn a_restart_is_spliced_after_what_the_client_has() {
        let mut collected = Collected::default();
        let mut client = Resumable::new(&mut collected, true);
        block_on(client.send_header(ResponseHeader::build(200, None).unwrap()));
        run(
            &mut client,
            &[
                chunk("a", Some(""), true, None),
                chunk("a", Some("Hello wo"), false, None),
            ],
        );
        assert!(client.resumable());
        let earlier = Usage {
            prompt_tokens: 5,
            completion_tokens: 2,
            ..Usage::default()
        };
        assert_eq!(client.continue_with(false, earlier), Continuation::Restart);
        assert!(block_on(
            client.send_header(ResponseHeader::build(200, None).unwrap())
        ));
        let usage = json!({"id": "b", "created": 9, "model": "b", "choices": [],
            "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}});
        run(
            &mut client,
            &[
                chunk("b", Some(""), true, None),
                chunk("b", Some("Hel"), false, None),
                chunk("b", Some("lo world"), false, None),
                chunk("b", None, false, Some("stop")),
                format!("data: {usage}\n\n"),
                "data: [DONE]\n\n".into(),
            ],
        );
        drop(client);
        let (text, events) = texts(&collected.body);
        assert_eq!(text, "Hello world");
        let chunks: Vec<&Value> = events.iter().filter(|e| e.is_object()).collect();
        assert!(chunks
            .iter()
            .all(|e| e["id"] == "a" && e["created"] == 7 && e["model"] == "a"));
        assert_eq!(
            chunks
                .iter()
                .filter(|e| e["choices"][0]["delta"]["role"].is_string())
                .count(),
            1
        );
        assert_eq!(
            chunks
                .iter()
                .filter(
                    |e| !e["choices"][0]["finish_reason"].is_null() && e["choices"][0].is_object()
                )
                .count(),
            1
        );
        let usage = chunks.iter().find(|e| e["usage"].is_object()).unwrap();
        assert_eq!(
            usage["usage"],
            json!({"prompt_tokens": 10, "completion_tokens": 6, "total_tokens": 16})
        );
        assert_eq!(events.last().unwrap(), "[DONE]");
    }

    #[test]
    fn a_restart_that_says_something_else_diverges() {
        let mut collected = Collected::default();
        let mut client = Resumable::new(&mut collected, true);
        block_on(client.send_header(ResponseHeader::build(200, None).unwrap()));
        run(&mut client, &[chunk("a", Some("Hello"), true, None)]);
        client.continue_with(false, Usage::default());
        let sent = block_on(
            client.send_body(Bytes::from(chunk("b", Some("Goodbye"), false, None)), false),
        );
        assert!(!sent, "the copy stops");
        assert!(client.diverged() && !client.resumable());
    }

    #[test]
    fn a_prefill_keeps_the_text_without_trailing_space_and_skips_its_repeat() {
        let mut collected = Collected::default();
        let mut client = Resumable::new(&mut collected, true);
        block_on(client.send_header(ResponseHeader::build(200, None).unwrap()));
        run(&mut client, &[chunk("a", Some("Hello "), true, None)]);
        assert_eq!(
            client.continue_with(true, Usage::default()),
            Continuation::Prefill("Hello".into())
        );
        run(
            &mut client,
            &[
                chunk("b", Some(" world"), true, None),
                "data: [DONE]\n\n".into(),
            ],
        );
        drop(client);
        assert_eq!(texts(&collected.body).0, "Hello world");
    }

    #[test]
    fn tool_calls_second_choices_and_finished_streams_are_not_resumed() {
        for event in [
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0}]}}]}"#,
            r#"{"choices":[{"index":1,"delta":{"content":"x"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
        ] {
            let mut collected = Collected::default();
            let mut client = Resumable::new(&mut collected, true);
            block_on(client.send_header(ResponseHeader::build(200, None).unwrap()));
            run(&mut client, &[format!("data: {event}\n\n")]);
            assert!(!client.resumable(), "{event}");
        }
    }

    #[test]
    fn an_event_cut_before_its_blank_line_is_ended_before_anything_else() {
        // The data line went out, its blank line did not.
        let event = chunk("a", Some("Hel"), true, None);
        let cut = event.trim_end_matches('\n').to_owned() + "\n";
        for restart in [true, false] {
            let mut collected = Collected::default();
            let mut client = Resumable::new(&mut collected, true);
            block_on(client.send_header(ResponseHeader::build(200, None).unwrap()));
            run(&mut client, &[cut.clone(), "data: {\"choi".into()]);
            if restart {
                client.continue_with(false, Usage::default());
                run(
                    &mut client,
                    &[
                        chunk("b", Some("Hello"), true, None),
                        "data: [DONE]\n\n".into(),
                    ],
                );
            } else {
                block_on(client.fail(Bytes::from_static(b"data: {\"error\":{}}\n\n")));
            }
            drop(client);
            let body = String::from_utf8(collected.body.to_vec()).unwrap();
            let events: Vec<&str> = body.split("\n\n").filter(|e| !e.is_empty()).collect();
            for event in &events {
                let payload = event.strip_prefix("data: ").unwrap();
                assert!(
                    payload == "[DONE]" || serde_json::from_str::<Value>(payload).is_ok(),
                    "every event whole and alone: {body:?}"
                );
            }
            if restart {
                assert_eq!(texts(&collected.body).0, "Hello");
            }
        }
    }

    #[test]
    fn a_line_too_long_to_hold_passes_through_and_ends_resumability() {
        let mut collected = Collected::default();
        let mut client = Resumable::new(&mut collected, true);
        block_on(client.send_header(ResponseHeader::build(200, None).unwrap()));
        run(&mut client, &[chunk("a", Some("Hi"), true, None)]);
        let piece = Bytes::from(vec![b'x'; 1 << 20]);
        let mut sent = 0;
        for _ in 0..(MAX_LINE_BYTES >> 20) + 2 {
            block_on(client.send_body(piece.clone(), false));
            sent += piece.len();
            assert!(client.partial.len() <= MAX_LINE_BYTES + piece.len());
        }
        assert!(!client.resumable());
        drop(client);
        assert!(collected.body.len() >= sent, "passed through");
    }

    #[test]
    fn a_prefill_is_a_trailing_assistant_message_and_lowers_the_limit() {
        let body = br#"{"model":"m","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}"#;
        let out: Value = serde_json::from_slice(&with_prefill(body, "Hel", 30).unwrap()).unwrap();
        assert_eq!(
            out["messages"][1],
            json!({"role": "assistant", "content": "Hel"})
        );
        assert_eq!(out["max_tokens"], 70);
        assert!(with_prefill(b"not json", "x", 0).is_none());
    }
}
