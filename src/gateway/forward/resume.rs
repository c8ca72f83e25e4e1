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

use crate::cost::{lines, memo, Usage, MAX_LINE_BYTES};
use crate::gateway::client::Client;
use crate::redact::{mask_every, redact_every, RedactKey, Redactor};
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use pingora::http::ResponseHeader;
use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};
use std::marker::PhantomData;

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
    /// Rewriting a continuation, from the second attempt that streams on
    /// (boxed: most streams never need one, and every request holds this).
    splice: Option<Box<Splice>>,
    /// The keys a continuation is masked of (see [`Resumable::masking`]).
    keys: &'c [RedactKey],
    /// What a continuation passes on unread once a line too long to hold
    /// went by, masked of every one of `keys` however its pieces split
    /// one. Empty for the first attempt.
    masks: Vec<Redactor<'c>>,
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
            keys: &[],
            masks: Vec::new(),
        }
    }

    /// Masks all a continuation sends, and the error event that ends a
    /// stream, of every one of `keys` (every provider's): a continuation's
    /// own redactor masks its provider's key only, and what goes out in
    /// it came from several providers. Its events are read out of JSON
    /// and written again (the first attempt's `id`, `created` and `model`
    /// put in), where a key's escaped form (`\u000a` for a key's `\n`)
    /// would be the key again; its comments, events that are not JSON
    /// and lines too long to hold pass on as they came; the error event
    /// may quote any provider's message.
    ///
    /// The events it writes again are masked before the record takes their
    /// text (the record is what the client has: a restart's repeat is
    /// compared with it); the lines it passes on as they came are masked
    /// whole (a key holds no line end); what goes unread after a line too
    /// long to hold is masked as it goes (`masks`).
    pub(crate) fn masking(mut self, keys: &'c [RedactKey]) -> Self {
        self.keys = keys;
        self
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
        self.splice = Some(Box::new(Splice {
            skip,
            strict,
            earlier,
            diverged: false,
        }));
        self.masks = self
            .keys
            .iter()
            .map(|key| Redactor::new(Some(key)))
            .collect();
        continuation
    }

    /// `out`, what a continuation passes on unread, masked of every
    /// provider's key however its pieces split one (`end`: nothing is held
    /// back). A first attempt's goes as it is.
    fn mask(&mut self, mut out: Bytes, end: bool) -> Bytes {
        for mask in &mut self.masks {
            out = mask.feed(out);
            if end {
                out = [&out[..], &mask.finish()[..]].concat().into();
            }
        }
        out
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
        // Its message may be any provider's words (a continuation's error).
        out.extend_from_slice(&mask_every(self.keys, &event));
        self.inner.send_body(out.freeze(), true).await;
    }

    /// Whether the client got the whole stream (its `[DONE]`).
    pub(crate) fn completed(&self) -> bool {
        self.record.done
    }

    /// Records and (for a continuation) rewrites the complete lines of
    /// `bytes`; returns what to send.
    fn process(&mut self, bytes: Bytes, end: bool) -> Bytes {
        if self.passthrough {
            return self.mask(bytes, end);
        }
        let out = self.process_lines(bytes, end);
        // A line too long to hold went by: what waits unended (the long
        // line's start, or the next line's behind a whole one) goes on
        // unread, as will the rest.
        if self.passthrough && !self.partial.is_empty() {
            let rest = std::mem::take(&mut self.partial).freeze();
            let rest = self.mask(rest, end);
            let mut all = BytesMut::from(&out[..]);
            all.extend_from_slice(&rest);
            return all.freeze();
        }
        out
    }

    /// [`Resumable::process`] until a line too long to hold goes by.
    fn process_lines(&mut self, bytes: Bytes, end: bool) -> Bytes {
        if self.splice.is_none() && self.partial.is_empty() && bytes.ends_with(b"\n") {
            // Whole lines of the first attempt (the meter sends whole
            // events): read, and sent on as they are.
            for line in lines(&bytes) {
                self.note(line);
            }
            return bytes;
        }
        self.partial.extend_from_slice(&bytes);
        // Bytes already scanned hold no line end.
        let complete = match memchr::memrchr(b'\n', &self.partial[self.scanned..]) {
            Some(last) => self.partial.split_to(self.scanned + last + 1),
            None if end => std::mem::take(&mut self.partial),
            None if self.partial.len() > MAX_LINE_BYTES => {
                // Too long to hold: passed on unread from here on (by
                // `process`, from `partial`).
                self.passthrough = true;
                self.record.final_ = true;
                return Bytes::new();
            }
            None => {
                self.scanned = self.partial.len();
                return Bytes::new();
            }
        };
        self.scanned = 0;
        if self.splice.is_none() && (!end || self.partial.is_empty()) {
            // The first attempt's events go out as they came: only read.
            for line in lines(&complete) {
                self.note(line);
            }
            return complete.freeze();
        }
        let mut out = BytesMut::with_capacity(complete.len());
        for line in lines(&complete) {
            self.line(line, &mut out);
        }
        if end && !self.partial.is_empty() {
            let rest = std::mem::take(&mut self.partial);
            self.line(&rest, &mut out);
        }
        out.freeze()
    }

    /// Takes note of a line of the first attempt, which goes out as it
    /// came.
    fn note(&mut self, line: &[u8]) {
        if self.too_long(line) {
            return;
        }
        match data_payload(line) {
            Some(payload) if payload.starts_with(b"[DONE]") => {
                self.record.final_ = true;
                self.record.done = true;
            }
            Some(payload) => self.record.observe(payload),
            None => {}
        }
    }

    /// Whether `line` is longer than a line is held: the stream is then
    /// passed on unread from it on (and cannot be continued), as when its
    /// read stops inside it, however its bytes were split between reads.
    fn too_long(&mut self, line: &[u8]) -> bool {
        // Its bytes without its line end, as an unended one's are counted.
        if unended(line).len() > MAX_LINE_BYTES {
            self.passthrough = true;
            self.record.final_ = true;
        }
        self.passthrough
    }

    /// One line of the stream.
    fn line(&mut self, line: &[u8], out: &mut BytesMut) {
        // A continuation's lines passed on as they came are masked whole.
        let keys = if self.splice.is_some() {
            self.keys
        } else {
            &[]
        };
        let pass = |out: &mut BytesMut| out.extend_from_slice(&mask_every(keys, line));
        if self.too_long(line) {
            pass(out);
            return;
        }
        let Some(splice) = &mut self.splice else {
            self.note(line);
            out.extend_from_slice(line);
            return;
        };
        let body = unended(line);
        if body.is_empty() {
            if !std::mem::take(&mut self.skip_blank_line) {
                out.extend_from_slice(line);
            }
            return;
        }
        let Some(payload) = data_payload(line) else {
            pass(out);
            return;
        };
        if payload.starts_with(b"[DONE]") {
            if splice.strict && !splice.skip.is_empty() {
                // The restart ended before repeating all the client has.
                splice.diverged = true;
                return;
            }
            self.record.final_ = true;
            self.record.done = true;
            pass(out);
            return;
        }
        // A restart's repeat is compared with what the client has, which
        // was masked of every key: masked the same way first.
        let repeating = splice.strict && !splice.skip.is_empty();
        let payload = if repeating {
            mask_every(keys, payload)
        } else {
            payload.into()
        };
        let Ok(Value::Object(mut event)) = serde_json::from_slice::<Value>(&payload) else {
            self.record.final_ = true;
            pass(out);
            return;
        };
        if !splice.rewrite(&mut event, &self.record) {
            self.skip_blank_line = true;
            return;
        }
        let rewritten = redact_every(self.keys, serde_json::to_vec(&event).unwrap_or_default());
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(&rewritten);
        out.extend_from_slice(b"\n");
        self.record.observe(&rewritten);
    }
}

/// A line without its line end (`\n`, `\r\n` or `\r`).
fn unended(line: &[u8]) -> &[u8] {
    let body = line.strip_suffix(b"\n").unwrap_or(line);
    body.strip_suffix(b"\r").unwrap_or(body)
}

/// The payload of a `data:` line, its spaces and line end trimmed.
fn data_payload(line: &[u8]) -> Option<&[u8]> {
    unended(line).strip_prefix(b"data:").map(<[u8]>::trim_ascii)
}

/// What [`Record::observe`] reads of a chunk, borrowed from its text and
/// in one pass: a tree of every chunk (a map allocated for each object in
/// it) cost more than the rest of forwarding it. Read as a tree reads it:
/// `id`, `created` and `model` count when there, `null` or not; `error`
/// when it says something ([`crate::openai::error_said`]), `object` when
/// it is the string `error` (vLLM's error event); `choices`
/// only as an array, a choice and its delta only as objects.
#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(borrow, default, deserialize_with = "crate::json::present")]
    id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "crate::json::present")]
    created: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "crate::json::present")]
    model: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "crate::json::present")]
    error: Option<&'a RawValue>,
    #[serde(borrow, default)]
    object: Option<&'a RawValue>,
    #[serde(borrow, default)]
    choices: Shaped<Vec<Shaped<ChunkChoice<'a>>>>,
}

/// One of a chunk's choices (a `null` field reads as `None`).
#[derive(Deserialize)]
struct ChunkChoice<'a> {
    #[serde(borrow, default)]
    index: Option<&'a RawValue>,
    #[serde(default)]
    finish_reason: Option<IgnoredAny>,
    #[serde(borrow, default)]
    delta: Shaped<ChunkDelta<'a>>,
}

/// A choice's delta (a `null` field reads as `None`).
#[derive(Deserialize)]
struct ChunkDelta<'a> {
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
    #[serde(default)]
    tool_calls: Option<IgnoredAny>,
    #[serde(default)]
    function_call: Option<IgnoredAny>,
    #[serde(borrow, default)]
    refusal: Option<&'a RawValue>,
}

/// Whether `raw` is a JSON value of the kind its first byte tells (`"` a
/// string).
fn is(raw: &RawValue, first: u8) -> bool {
    raw.get().as_bytes().first() == Some(&first)
}

/// A value read as `T` when it has `T`'s shape (an array for a `Vec`, an
/// object for a struct), and passed over as nothing when it is any other
/// JSON value, as a tree's `value["field"]` reads it.
struct Shaped<T>(Option<T>);

impl<T> Default for Shaped<T> {
    fn default() -> Self {
        Shaped(None)
    }
}

/// Whether a type is read from a JSON array (else from an object).
trait Shape {
    const ARRAY: bool;
}

impl<T> Shape for Vec<T> {
    const ARRAY: bool = true;
}

impl Shape for ChunkChoice<'_> {
    const ARRAY: bool = false;
}

impl Shape for ChunkDelta<'_> {
    const ARRAY: bool = false;
}

impl<'de, T: Deserialize<'de> + Shape> Deserialize<'de> for Shaped<T> {
    fn deserialize<D: Deserializer<'de>>(value: D) -> Result<Self, D::Error> {
        value
            .deserialize_any(ShapedVisitor(PhantomData))
            .map(Shaped)
    }
}

/// Reads a [`Shaped`] value from whatever JSON value is there.
struct ShapedVisitor<T>(PhantomData<T>);

impl<'de, T: Deserialize<'de> + Shape> Visitor<'de> for ShapedVisitor<T> {
    type Value = Option<T>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        if T::ARRAY {
            return T::deserialize(SeqAccessDeserializer::new(seq)).map(Some);
        }
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        if !T::ARRAY {
            return T::deserialize(MapAccessDeserializer::new(map)).map(Some);
        }
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(None)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

impl Record {
    /// Takes note of an event the client was sent (`payload`, its JSON).
    /// An event it cannot read, or one after which a continuation could
    /// not follow, makes the stream final.
    fn observe(&mut self, payload: &[u8]) {
        // Nothing more is needed of a stream that cannot be resumed.
        if self.final_ {
            return;
        }
        if !payload.starts_with(b"{") || self.read(payload).is_err() {
            self.final_ = true;
        }
    }

    /// [`Record::observe`] of a JSON object: as the stream meter read it
    /// when it left its reading ([`memo`]), else read here.
    fn read(&mut self, payload: &[u8]) -> serde_json::Result<()> {
        if let Some(reading) = memo::take(payload) {
            return self.apply(&reading, payload);
        }
        let chunk: Chunk = crate::json::from_bytes(payload)?;
        for (slot, field) in [
            (&mut self.id, chunk.id),
            (&mut self.created, chunk.created),
            (&mut self.model, chunk.model),
        ] {
            if let (None, Some(raw)) = (&slot, field) {
                *slot = Some(serde_json::from_str(raw.get())?);
            }
        }
        let says_error = chunk
            .object
            .is_some_and(|object| crate::json::is_str(object, "error"));
        let error = chunk
            .error
            .is_some_and(|error| crate::openai::error_said(error.get()));
        if error || says_error {
            self.final_ = true;
        }
        let choices = chunk.choices.0.unwrap_or_default();
        // A choice that is not an object carries nothing.
        for choice in choices.into_iter().filter_map(|c| c.0) {
            let delta = choice.delta.0.as_ref();
            if memo::choice_ends(
                choice.index,
                choice.finish_reason.is_some(),
                delta.is_some_and(|d| d.tool_calls.is_some() || d.function_call.is_some()),
                delta.and_then(|d| d.refusal),
            ) {
                self.final_ = true;
            }
            if let Some(content) = delta.and_then(|d| d.content).filter(|c| is(c, b'"')) {
                push_json_str(&mut self.text, content.get().as_bytes())?;
            }
        }
        Ok(())
    }

    /// [`Record::read`] from the meter's reading of `json`, in the same
    /// order.
    fn apply(&mut self, reading: &memo::Reading, json: &[u8]) -> serde_json::Result<()> {
        // Positions outside `json` would be a fault of the reading's: the
        // stream is then not resumed rather than the gateway stopped.
        let at = |at: &std::ops::Range<usize>| {
            json.get(at.clone())
                .ok_or_else(|| serde::de::Error::custom("a reading outside its event"))
        };
        let slots = [&mut self.id, &mut self.created, &mut self.model];
        for (slot, position) in slots.into_iter().zip(&reading.identity) {
            if let (None, Some(position)) = (&slot, position) {
                *slot = Some(serde_json::from_slice(at(position)?)?);
            }
        }
        self.final_ |= reading.ends;
        if let Some(position) = &reading.content {
            push_json_str(&mut self.text, at(position)?)?;
        }
        Ok(())
    }
}

/// Appends the text of a JSON string: as it is when it has no escape and
/// no byte JSON refuses in a string (nearly always), else as serde reads
/// it.
fn push_json_str(text: &mut String, json: &[u8]) -> serde_json::Result<()> {
    let plain = json
        .strip_prefix(b"\"")
        .and_then(|json| json.strip_suffix(b"\""))
        .filter(|inner| !inner.iter().any(|&b| b == b'"' || b == b'\\' || b < 0x20))
        .and_then(|inner| std::str::from_utf8(inner).ok());
    if let Some(plain) = plain {
        text.push_str(plain);
        return Ok(());
    }
    match serde_json::from_slice::<&str>(json) {
        Ok(borrowed) => text.push_str(borrowed),
        Err(_) => text.push_str(&serde_json::from_slice::<String>(json)?),
    }
    Ok(())
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

    fn send_header<'a, 'f>(&'a mut self, header: Box<ResponseHeader>) -> BoxFuture<'f, bool>
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
        let mut out = self.process(body, end);
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

    fn swap_send_timeout(
        &mut self,
        timeout: Option<std::time::Duration>,
    ) -> Option<std::time::Duration> {
        self.inner.swap_send_timeout(timeout)
    }

    fn progress(&self) -> crate::gateway::client::Progress {
        self.inner.progress()
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

    proptest::proptest! {
        /// A JSON string's text is read as serde reads it, with or without
        /// escapes, quotes, control characters or bytes that are not
        /// UTF-8 (the record's text, or its error).
        #[test]
        fn a_json_string_is_read_as_serde_reads_it(
            inner in proptest::collection::vec(proptest::sample::select(
                b"ab \\\"\t\n/u0\xc3\xa9\xff".to_vec()), 0..12),
            quoted in proptest::prelude::any::<bool>(),
        ) {
            let json = if quoted { [&b"\""[..], &inner, b"\""].concat() } else { inner };
            let mut text = String::from("before ");
            let read = push_json_str(&mut text, &json).map(|()| text);
            let serde = serde_json::from_slice::<String>(&json).map(|s| format!("before {s}"));
            proptest::prop_assert_eq!(read.ok(), serde.ok());
        }
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
        block_on(client.send_header(Box::new(ResponseHeader::build(200, None).unwrap())));
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
        assert!(block_on(client.send_header(Box::new(
            ResponseHeader::build(200, None).unwrap()
        ))));
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
        block_on(client.send_header(Box::new(ResponseHeader::build(200, None).unwrap())));
        run(&mut client, &[chunk("a", Some("Hello"), true, None)]);
        client.continue_with(false, Usage::default());
        let sent = block_on(
            client.send_body(Bytes::from(chunk("b", Some("Goodbye"), false, None)), false),
        );
        assert!(!sent, "the copy stops");
        assert!(client.diverged() && !client.resumable());
    }

    #[test]
    fn a_restart_compares_its_repeat_with_what_the_client_has_masked() {
        // The second attempt says a provider's key; the client has it
        // masked. The third restarts and repeats it: masked by its own
        // redactor when it is its own key, as it is when it is another's.
        // Either way the repeat is compared masked, as the client has it,
        // and skipped.
        for (secret, restarter_masks_it) in [
            ("sk-third-0123456789", true),
            ("sk-first-0123456789", false),
        ] {
            let keys = [RedactKey::new(secret).unwrap()];
            let mask = "*".repeat(secret.len());
            let mut collected = Collected::default();
            let mut client = Resumable::new(&mut collected, true).masking(&keys);
            block_on(client.send_header(Box::new(ResponseHeader::build(200, None).unwrap())));
            run(&mut client, &[chunk("a", Some("Hello wor"), true, None)]);
            client.continue_with(false, Usage::default());
            run(
                &mut client,
                &[
                    chunk("b", Some("Hello wor"), true, None),
                    chunk("b", Some(&format!("ld {secret} more")), false, None),
                ],
            );
            client.continue_with(false, Usage::default());
            let repeated = if restarter_masks_it { &mask } else { secret };
            run(
                &mut client,
                &[
                    chunk(
                        "c",
                        Some(&format!("Hello world {repeated} more")),
                        true,
                        None,
                    ),
                    chunk("c", Some("!"), false, Some("stop")),
                    "data: [DONE]\n\n".into(),
                ],
            );
            assert!(!client.diverged(), "{secret}");
            drop(client);
            let text = texts(&collected.body).0;
            assert_eq!(text, format!("Hello world {mask} more!"), "{secret}");
        }
    }

    #[test]
    fn a_continuation_passed_on_unread_is_masked_however_it_is_cut() {
        // Another provider's key in a comment, and in a line too long to
        // hold before, across and after the bound; the long line's first
        // piece ends without a line end past the bound (passed on unread
        // from there), cut at every byte of the key across the bound.
        let secret = "sk-first-0123456789";
        let keys = [RedactKey::new(secret).unwrap()];
        let mut long = format!(": {secret}\n\n");
        let comment = long.len();
        long.push_str("data: {\"choices\":[{\"delta\":{\"content\":\"");
        long.push_str(secret);
        let bound = long.len() + MAX_LINE_BYTES - 4;
        long.extend(std::iter::repeat_n('x', bound - long.len()));
        long.push_str(secret);
        long.extend(std::iter::repeat_n('x', 1000));
        long.push_str(secret);
        long.push_str("\"}}]}\n\ndata: [DONE]\n\n");
        for cut in bound - 1..=bound + secret.len() {
            let mut collected = Collected::default();
            let mut client = Resumable::new(&mut collected, true).masking(&keys);
            block_on(client.send_header(Box::new(ResponseHeader::build(200, None).unwrap())));
            run(&mut client, &[chunk("a", Some("Hello"), true, None)]);
            client.continue_with(true, Usage::default());
            for piece in [&long[..comment], &long[comment..cut]] {
                block_on(client.send_body(Bytes::from(piece.to_owned()), false));
            }
            block_on(client.send_body(Bytes::from(long[cut..].to_owned()), true));
            drop(client);
            let body = String::from_utf8_lossy(&collected.body);
            assert_eq!(
                body.matches(&"*".repeat(secret.len())).count(),
                4,
                "cut at {cut}"
            );
            assert!(!body.contains(secret), "cut at {cut}");
            assert!(body.ends_with("data: [DONE]\n\n"), "cut at {cut}");
        }
    }

    #[test]
    fn a_prefill_keeps_the_text_without_trailing_space_and_skips_its_repeat() {
        let mut collected = Collected::default();
        let mut client = Resumable::new(&mut collected, true);
        block_on(client.send_header(Box::new(ResponseHeader::build(200, None).unwrap())));
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
            block_on(client.send_header(Box::new(ResponseHeader::build(200, None).unwrap())));
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
            block_on(client.send_header(Box::new(ResponseHeader::build(200, None).unwrap())));
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
        block_on(client.send_header(Box::new(ResponseHeader::build(200, None).unwrap())));
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
    fn a_line_too_long_to_hold_ends_resumability_however_it_came() {
        // A JSON event a client could read, longer than a line is held:
        // in pieces that stop inside it, or whole in one.
        let long = format!(
            "data: {{\"id\":\"b\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{}\"}}}}]}}\n\n",
            "y".repeat(MAX_LINE_BYTES)
        );
        // Then the next event, whose first line may begin in the piece the
        // long line ends in (the meter's pieces through such an event are
        // cut wherever the provider's reads were).
        let long = long + "data: {\"id\":\"b\",\"choices\":[]}\n\n";
        let line_end = long.find('\n').unwrap();
        for cut in [line_end + 1, line_end + 2, line_end + 4, long.len() - 1] {
            for piece in [64 * 1024, long.len()] {
                let mut collected = Collected::default();
                let mut client = Resumable::new(&mut collected, true);
                block_on(client.send_header(Box::new(ResponseHeader::build(200, None).unwrap())));
                run(&mut client, &[chunk("a", Some("Hi"), true, None)]);
                let (head, tail) = long.as_bytes().split_at(cut);
                for bytes in head.chunks(piece).chain([tail]) {
                    block_on(client.send_body(Bytes::copy_from_slice(bytes), false));
                }
                assert!(!client.resumable(), "pieces of {piece}, cut at {cut}");
                drop(client);
                assert!(
                    collected.body.ends_with(long.as_bytes()),
                    "passed on as it came: pieces of {piece}, cut at {cut}"
                );
            }
        }
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

    /// What `Record::observe` did when it read each event as a tree, kept
    /// as the reference for the borrowed, one-pass reading.
    fn observe_as_a_tree(record: &mut Record, payload: &[u8]) {
        if record.final_ {
            return;
        }
        let Ok(Value::Object(event)) = serde_json::from_slice::<Value>(payload) else {
            record.final_ = true;
            return;
        };
        for (field, slot) in [
            ("id", &mut record.id),
            ("created", &mut record.created),
            ("model", &mut record.model),
        ] {
            if slot.is_none() {
                *slot = event.get(field).cloned();
            }
        }
        if event.get("error").is_some_and(crate::openai::error_says)
            || event.get("object").and_then(Value::as_str) == Some("error")
        {
            record.final_ = true;
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
                record.final_ = true;
            }
            if let Some(text) = delta["content"].as_str() {
                record.text.push_str(text);
            }
        }
    }

    /// Chunk-like JSON: the fields the record reads at their places, each
    /// missing, `null`, of the expected kind or of another, with other
    /// fields beside them.
    fn chunk_like() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::option::{of, weighted};
        use proptest::prelude::*;
        let leaf = prop_oneof![
            2 => Just(Value::Null),
            1 => prop::sample::select(vec![0i64, 1, -1, 7]).prop_map(Value::from),
            1 => prop::sample::select(vec![1.5f64, 0.0, 1e20]).prop_map(Value::from),
            1 => Just(Value::from(u64::MAX)),
            1 => any::<bool>().prop_map(Value::from),
            3 => prop::sample::select(vec!["", "Hel", " lo ", "lo \"x\"\n", "\u{e9}t\u{e9}", "\\"])
                .prop_map(Value::from),
        ];
        let any_value = leaf.clone().prop_recursive(2, 8, 3, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
                prop::collection::btree_map("[a-z]{1,8}", inner, 0..3)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        });
        let field = prop_oneof![3 => leaf, 1 => any_value.clone()];
        let object = |fields: Vec<(&'static str, Option<Value>)>| {
            Value::Object(
                fields
                    .into_iter()
                    .filter_map(|(k, v)| Some((k.to_owned(), v?)))
                    .collect(),
            )
        };
        // What ends resumability is mostly missing, so that what follows
        // it is read too.
        let rare = |f: BoxedStrategy<Value>| weighted(0.2, f);
        let field = field.boxed();
        let delta = (
            of(field.clone()),
            rare(field.clone()),
            rare(field.clone()),
            of(field.clone()),
            of(field.clone()),
        )
            .prop_map(move |(content, tool_calls, function_call, refusal, role)| {
                object(vec![
                    ("content", content),
                    ("tool_calls", tool_calls),
                    ("function_call", function_call),
                    ("refusal", refusal),
                    ("role", role),
                ])
            });
        let choice = (
            rare(field.clone()),
            of(prop_oneof![3 => delta, 1 => field.clone()]),
            rare(field.clone()),
        )
            .prop_map(move |(index, delta, finish_reason)| {
                object(vec![
                    ("index", index),
                    ("delta", delta),
                    ("finish_reason", finish_reason),
                ])
            });
        let choices = prop_oneof![
            3 => prop::collection::vec(prop_oneof![4 => choice, 1 => field.clone()], 0..3)
                .prop_map(Value::Array),
            1 => field.clone(),
        ];
        (
            of(field.clone()),
            of(field.clone()),
            of(field.clone()),
            rare(field.clone()),
            rare(prop_oneof![Just(Value::from("error")), field.clone()].boxed()),
            weighted(0.8, choices),
            of(any_value),
        )
            .prop_map(move |(id, created, model, error, kind, choices, other)| {
                object(vec![
                    ("id", id),
                    ("created", created),
                    ("model", model),
                    ("error", error),
                    ("object", kind),
                    ("choices", choices),
                    ("usage", other),
                ])
            })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2048))]
        /// Reading events borrowed, in one pass, records what reading each
        /// as a tree did, whatever their fields hold.
        #[test]
        fn the_record_reads_events_as_a_tree_would(
            events in proptest::collection::vec(
                proptest::prop_oneof![
                    chunk_like(),
                    proptest::strategy::Just(json!([1])),
                    proptest::strategy::Just(json!("text")),
                ],
                1..4,
            )
        ) {
            let (mut borrowed, mut tree) = (Record::default(), Record::default());
            for event in &events {
                let payload = serde_json::to_vec(event).unwrap();
                borrowed.observe(&payload);
                observe_as_a_tree(&mut tree, &payload);
                proptest::prop_assert_eq!(format!("{borrowed:?}"), format!("{tree:?}"), "{}", event);
            }
        }
    }

    /// The data lines of what the stream meter passes on of `json` sent as
    /// one event (with `strip`, as for a client that did not ask for
    /// usage); the meter leaves its readings as it goes.
    fn through_the_meter(json: &str, strip: bool) -> Vec<Vec<u8>> {
        let mut meter = crate::cost::StreamMeter::new(strip);
        let out = meter.feed(Bytes::from(format!("data: {json}\n\n")));
        lines(&out)
            .filter_map(data_payload)
            .filter(|payload| *payload != b"[DONE]")
            .map(<[u8]>::to_vec)
            .collect()
    }

    #[test]
    fn the_meter_leaves_its_reading_of_a_chunk_for_the_record() {
        let chunk = r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","system_fingerprint":null,"choices":[{"index":0,"delta":{"content":"tok "},"logprobs":null,"finish_reason":null}]"#;
        for (json, strip) in [
            (format!("{chunk}}}"), false),
            (format!("{chunk}}}"), true),
            (format!(r#"{chunk},"usage":null}}"#), true),
            (format!(r#"{chunk},"usage":null}}"#), false),
        ] {
            memo::clear();
            let lines = through_the_meter(&json, strip);
            assert_eq!(lines.len(), 1, "{json}");
            let mut record = Record::default();
            assert!(memo::take(&lines[0]).is_some(), "{json} (strip: {strip})");
            memo::clear();
            through_the_meter(&json, strip);
            record.observe(&lines[0]);
            assert_eq!(record.text, "tok ");
            assert_eq!(record.id, Some(json!("chatcmpl-1")));
            assert!(!record.final_);
        }
    }

    /// Events the record cannot read (a member it reads given twice) or
    /// reads under another spelling get no reading from the meter, or the
    /// one the record's own read gives.
    #[test]
    fn members_given_twice_or_escaped_are_read_as_the_record_reads_them() {
        for json in [
            r#"{"id":"c","choices":[{"index":0,"index":0,"delta":{"content":"x"}}]}"#,
            r#"{"id":"c","choices":[{"index":0,"delta":{"content":"x","refusal":null,"refusal":null}}]}"#,
            r#"{"id":"c","choices":[{"\u0069ndex":1,"delta":{"content":"x"}}]}"#,
            r#"{"id":"c","choices":[{"index":0,"delta":{"content":"x","\u0072efusal":"no"}}]}"#,
            r#"{"id":"c","choices":[{"index":0,"delta":{"content":"x","index":3,"index":4}}]}"#,
        ] {
            for strip in [false, true] {
                memo::clear();
                let (mut told, mut own) = (Record::default(), Record::default());
                for payload in through_the_meter(json, strip) {
                    told.observe(&payload);
                    memo::clear();
                    own.observe(&payload);
                }
                assert_eq!(format!("{told:?}"), format!("{own:?}"), "{json}");
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2048))]
        /// The meter's reading, taken under the bytes the client gets,
        /// records what reading those bytes does, whatever the event holds
        /// and wherever a `"usage":null` the meter takes out stands.
        #[test]
        fn a_reading_the_meter_left_records_what_reading_the_event_does(
            events in proptest::collection::vec(
                (
                    chunk_like(),
                    proptest::prelude::any::<bool>(),
                    proptest::prelude::any::<Option<proptest::sample::Index>>(),
                    proptest::prelude::any::<bool>(),
                ),
                1..4,
            )
        ) {
            let (mut told, mut own) = (Record::default(), Record::default());
            for (event, strip, nest, escaped) in &events {
                let mut json = serde_json::to_string(event).unwrap();
                if let Some(at) = nest {
                    // A `"usage":null` member opening some object, or one
                    // whose key only ends so (`"x\"usage"`).
                    let opens: Vec<usize> = json.match_indices('{').map(|(i, _)| i).collect();
                    let i = opens[at.index(opens.len())];
                    let key = if *escaped { r#""x\"usage""# } else { r#""usage""# };
                    let comma = if json[i + 1..].starts_with('}') { "" } else { "," };
                    json.insert_str(i + 1, &format!("{key}:null{comma}"));
                }
                memo::clear();
                for payload in through_the_meter(&json, *strip) {
                    told.observe(&payload);
                    memo::clear();
                    own.observe(&payload);
                    proptest::prop_assert_eq!(format!("{told:?}"), format!("{own:?}"), "{}", json);
                }
            }
        }
    }

    /// What the record does not read it skips as the meter does (unchecked
    /// beyond the JSON's shape): a value a tree could not hold there no
    /// longer ends resumability, since the meter passed the event on.
    #[test]
    fn fields_the_record_does_not_read_are_skipped_as_the_meter_skips_them() {
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        for (odd, text) in [
            (r#""x":1e400"#.to_owned(), "a"),
            (format!(r#""x":{deep}"#), "a"),
            (r#""system_fingerprint":"\ud800""#.to_owned(), "a"),
            (
                r#""x":1,"choices":[{"index":1e400,"delta":{"content":"a","role":"\udc00"}}]"#
                    .to_owned(),
                "a",
            ),
        ] {
            let event = if odd.contains("choices") {
                format!(r#"{{"id":"c",{odd}}}"#)
            } else {
                format!(r#"{{"id":"c",{odd},"choices":[{{"index":0,"delta":{{"content":"a"}}}}]}}"#)
            };
            let mut record = Record::default();
            record.observe(event.as_bytes());
            assert!(!record.final_, "{event}");
            assert_eq!(record.text, text, "{event}");
            assert_eq!(record.id, Some(json!("c")));
        }
        let mut record = Record::default();
        record.observe(b"{\"skipped\":\"\xff\xfe\",\"choices\":[{\"delta\":{\"content\":\"a\"}}]}");
        assert!(!record.final_);
        assert_eq!(record.text, "a");
    }

    #[test]
    fn an_event_the_record_cannot_read_ends_resumability() {
        for payload in [
            &br#"{"choices":[{"delta":{"content":"a","content":"b"}}]}"#[..],
            br#"{"id":"a","id":"b"}"#,
            br#"{"choices":[{"delta":{"content":"a"}}]"#,
            br#"{"choices":[]} x"#,
            b"[]",
            b"",
        ] {
            let mut record = Record::default();
            record.observe(payload);
            assert!(record.final_, "{}", String::from_utf8_lossy(payload));
        }
        let mut record = Record::default();
        record.observe(br#"{"choices":[{"index":0,"delta":{"content":"caf\u00e9 \"x\""}},7]}"#);
        assert!(!record.final_);
        assert_eq!(record.text, "caf\u{e9} \"x\"");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// The first attempt's bytes go out as they came, however the
        /// provider's reads cut them, and the record reads the same events
        /// from them as from the stream in one piece.
        #[test]
        fn the_first_attempt_goes_out_as_it_came_however_it_is_cut(
            texts in proptest::collection::vec("[a-z \"\\\\\n]{0,6}", 1..6),
            crlf in proptest::bool::ANY,
            done in proptest::bool::ANY,
            cuts in proptest::collection::vec(0usize..2000, 0..8),
        ) {
            let mut body = String::from(": keep-alive\n\n");
            for (i, text) in texts.iter().enumerate() {
                body.push_str(&chunk("a", Some(text), i == 0, None));
            }
            if done {
                body.push_str("data: [DONE]");
            }
            let body = if crlf { body.replace('\n', "\r\n") } else { body };
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (body.len() + 1)).collect();
            cuts.extend([0, body.len()]);
            cuts.sort_unstable();
            cuts.dedup();

            let mut collected = Collected::default();
            let mut client = Resumable::new(&mut collected, true);
            block_on(client.send_header(Box::new(ResponseHeader::build(200, None).unwrap())));
            for (i, piece) in cuts.windows(2).enumerate() {
                let end = i + 2 == cuts.len();
                let piece = Bytes::copy_from_slice(&body.as_bytes()[piece[0]..piece[1]]);
                block_on(client.send_body(piece, end));
            }
            let record = (client.record.text.clone(), client.record.done, client.record.final_);
            drop(client);
            proptest::prop_assert_eq!(&collected.body[..], body.as_bytes());

            let mut whole = Collected::default();
            let mut client = Resumable::new(&mut whole, true);
            block_on(client.send_header(Box::new(ResponseHeader::build(200, None).unwrap())));
            block_on(client.send_body(Bytes::from(body.clone()), true));
            proptest::prop_assert_eq!(&record.0, &texts.concat());
            proptest::prop_assert_eq!(
                record,
                (client.record.text.clone(), client.record.done, client.record.final_)
            );
        }
    }
}
