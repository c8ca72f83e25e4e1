//! Token usage and what it costs.
//!
//! Usage is read from the provider's answer on its way to the client:
//! [`usage_from_json`] for JSON bodies, [`StreamMeter`] for SSE streams, fed
//! chunk by chunk (chunks do not align with events, so it keeps the partial
//! last line). When the gateway asked the provider for
//! `stream_options.include_usage` on the client's behalf, the meter removes
//! the usage chunk and the `"usage":null` fields again, so the client sees
//! what the provider would have sent it.
//!
//! When the provider reports no usage (some OpenAI-compatible servers ignore
//! `include_usage`) or the answer breaks off, the gateway counts itself,
//! never nothing ([`Estimate`]): the prompt's text and the generated text
//! (content, reasoning, tool-call arguments) with the model family's
//! tokenizer, the completion capped at the request's token limit; a client
//! that asked for `include_usage` gets that count as its usage chunk. The
//! counts are marked estimated. Admission reserves request body bytes / 4
//! for the prompt (no tokenizer on the hot path).

use crate::config::Price;
use memchr::memmem::{Finder, FinderRev};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
use std::ops::Range;
use std::sync::LazyLock;

/// Upper bound on any one usage number a provider reports; larger (absurd)
/// numbers are treated as missing so they cannot corrupt accounting.
pub const MAX_REPORTED_TOKENS: u64 = 100_000_000;

/// Completion tokens reserved at admission when the request sets neither
/// `max_tokens` nor `max_completion_tokens`.
pub const DEFAULT_COMPLETION_ESTIMATE: u64 = 1024;

/// The most completion tokens the gateway counts for an answer without
/// usage when the request set no limit: an answer cut at the gateway's
/// size bound (or a hostile provider's padding) is not billed by its bytes
/// beyond what a model generates in one answer.
pub const MAX_ESTIMATED_COMPLETION_TOKENS: u64 = 128 * 1024;

/// Longest SSE line the meter holds while waiting for its end; a provider
/// sending an endless line cannot make the gateway buffer it.
pub const MAX_LINE_BYTES: usize = 1024 * 1024;

/// Non-streamed bodies are kept for usage parsing up to this size; past it
/// the gateway estimates.
pub const MAX_METERED_JSON_BYTES: usize = 16 * 1024 * 1024;

/// Tokens used by one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens, cached ones included.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Prompt tokens served from the provider's cache.
    pub cached_tokens: u64,
    /// Whether the numbers are the gateway's estimate rather than the provider's.
    pub estimated: bool,
    /// Images generated or edited.
    pub images: u64,
    /// Characters of text spoken.
    pub characters: u64,
    /// Milliseconds of audio transcribed or translated.
    pub audio_ms: u64,
    /// The processing tier the provider says it served the tokens at
    /// (`service_tier` in its answer); `None` when it did not say.
    pub tier: Option<ServiceTier>,
}

/// A processing tier an OpenAI request is served at (`service_tier`):
/// priced apart from the standard one when the config says so
/// (`pricing.<model>.service_tiers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServiceTier {
    /// The standard tier (`default`; Anthropic's `standard`).
    Default,
    /// `flex`: slower, cheaper.
    Flex,
    /// `priority` (also asked for as `fast`).
    Priority,
    /// `scale`: capacity bought ahead.
    Scale,
}

impl ServiceTier {
    /// The tiers priced apart from the standard one, in the config's order.
    pub const PRICED: [ServiceTier; 3] =
        [ServiceTier::Flex, ServiceTier::Priority, ServiceTier::Scale];

    /// The tier a `service_tier` value names, as a request or an answer
    /// gives it (`fast` is OpenAI's other name for `priority`; Anthropic
    /// reports `standard`); `None` for `auto` (the provider decides) and
    /// names the gateway does not know.
    pub fn from_name(name: &str) -> Option<ServiceTier> {
        match name {
            "default" | "standard" => Some(ServiceTier::Default),
            "flex" => Some(ServiceTier::Flex),
            "priority" | "fast" => Some(ServiceTier::Priority),
            "scale" => Some(ServiceTier::Scale),
            _ => None,
        }
    }

    /// The tier a request's `service_tier` asks for: as
    /// [`ServiceTier::from_name`], but for Anthropic's `standard`, which
    /// OpenAI refuses in a request.
    pub fn asked(name: &str) -> Option<ServiceTier> {
        (name != "standard").then(|| ServiceTier::from_name(name))?
    }

    /// The tier a JSON value names ([`ServiceTier::from_name`] of a string).
    pub fn from_json(raw: &RawValue) -> Option<ServiceTier> {
        let name = raw.get().strip_prefix('"')?.strip_suffix('"')?;
        match name.contains('\\') {
            // Escapes (`"fl\u0065x"` is `flex` too): read it.
            true => ServiceTier::from_name(&serde_json::from_str::<String>(raw.get()).ok()?),
            false => ServiceTier::from_name(name),
        }
    }

    /// Its name as OpenAI writes it in an answer.
    pub fn name(self) -> &'static str {
        match self {
            ServiceTier::Default => "default",
            ServiceTier::Flex => "flex",
            ServiceTier::Priority => "priority",
            ServiceTier::Scale => "scale",
        }
    }
}

impl Usage {
    /// The cost in pico-dollars at `price` (zero without a price), its
    /// tokens at the price of the tier they were served at (the standard
    /// one when the price has none for it).
    pub fn cost_pusd(&self, price: Option<&Price>) -> i64 {
        let Some(price) = price else { return 0 };
        let tokens = price.tokens_at(self.tier);
        let cached = self.cached_tokens.min(self.prompt_tokens);
        let uncached = self.prompt_tokens - cached;
        let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let audio = i128::from(self.audio_ms) * i128::from(price.audio_second) / 1000;
        count(uncached)
            .saturating_mul(tokens.input)
            .saturating_add(count(cached).saturating_mul(tokens.cached_input))
            .saturating_add(count(self.completion_tokens).saturating_mul(tokens.output))
            .saturating_add(count(self.images).saturating_mul(price.image))
            .saturating_add(count(self.characters).saturating_mul(price.character))
            .saturating_add(i64::try_from(audio).unwrap_or(i64::MAX))
    }

    /// All tokens.
    pub fn total(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }

    /// Both usages together (estimated when either is).
    pub fn plus(self, other: Usage) -> Usage {
        Usage {
            prompt_tokens: self.prompt_tokens.saturating_add(other.prompt_tokens),
            completion_tokens: self
                .completion_tokens
                .saturating_add(other.completion_tokens),
            cached_tokens: self.cached_tokens.saturating_add(other.cached_tokens),
            estimated: self.estimated || other.estimated,
            images: self.images.saturating_add(other.images),
            characters: self.characters.saturating_add(other.characters),
            audio_ms: self.audio_ms.saturating_add(other.audio_ms),
            tier: other.tier.or(self.tier),
        }
    }
}

/// Prompt tokens estimated from the request body's size.
pub fn estimate_prompt_tokens(body_len: usize) -> u64 {
    (body_len as u64).div_ceil(4).max(1)
}

/// Tokens reserved at admission: the prompt estimate plus the completion
/// budget the request asks for (or [`DEFAULT_COMPLETION_ESTIMATE`]).
pub fn estimate_request_tokens(body_len: usize, max_tokens: Option<u64>, generates: bool) -> u64 {
    let completion = if generates {
        max_tokens
            .unwrap_or(DEFAULT_COMPLETION_ESTIMATE)
            .min(MAX_REPORTED_TOKENS)
    } else {
        0
    };
    estimate_prompt_tokens(body_len) + completion
}

/// A usage object: chat completions' names, or the Responses API's
/// (`input_tokens`, `output_tokens`, `input_tokens_details`).
#[derive(Deserialize)]
struct UsageWire {
    #[serde(default, alias = "input_tokens")]
    prompt_tokens: Option<u64>,
    #[serde(default, alias = "output_tokens")]
    completion_tokens: Option<u64>,
    #[serde(default, alias = "input_tokens_details")]
    prompt_tokens_details: Option<PromptDetails>,
    /// Seconds of audio (a transcription's `{"type":"duration"}` usage);
    /// anything but a number is ignored, not fatal to the tokens.
    #[serde(default, deserialize_with = "any_number")]
    seconds: Option<f64>,
}

/// A number, or `None` for any other value.
fn any_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    Ok(serde_json::Value::deserialize(d)?.as_f64())
}

/// The longest audio the gateway believes a provider billed: a day.
const MAX_AUDIO_MS: u64 = 24 * 3600 * 1000;

#[derive(Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

impl UsageWire {
    fn into_usage(self) -> Option<Usage> {
        // `{}` (or only names the gateway does not read) reports nothing,
        // and a completion without its prompt only half: counted, not
        // billed as zero. (A prompt without a completion is an
        // embedding's whole report.)
        if self.prompt_tokens.is_none()
            && (self.completion_tokens.is_some() || self.seconds.is_none())
        {
            return None;
        }
        let prompt = self.prompt_tokens.unwrap_or(0);
        let completion = self.completion_tokens.unwrap_or(0);
        let cached = self
            .prompt_tokens_details
            .and_then(|d| d.cached_tokens)
            .unwrap_or(0);
        if prompt > MAX_REPORTED_TOKENS || completion > MAX_REPORTED_TOKENS || cached > prompt {
            return None;
        }
        let audio_ms = self
            .seconds
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map_or(0, |s| ((s * 1000.0).round() as u64).min(MAX_AUDIO_MS));
        Some(Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            cached_tokens: cached,
            estimated: false,
            audio_ms,
            ..Default::default()
        })
    }
}

/// What the meter reads of an answer or event, its `service_tier` kept
/// aside ([`Tiered`]).
pub(super) type Probe<'a> = Tiered<'a, ProbeFields<'a>>;

#[derive(Deserialize)]
pub(super) struct ProbeFields<'a> {
    #[serde(borrow, default)]
    choices: Option<Vec<Object<'a, ChoiceProbe<'a>>>>,
    /// Kept raw: a malformed `usage` must not hide the generated text.
    #[serde(borrow, default)]
    usage: Option<&'a RawValue>,
    /// A Responses API event's response (its id, and its usage once
    /// complete), and its text delta.
    #[serde(borrow, default)]
    response: Option<Tiered<'a, ResponseProbe<'a>>>,
    #[serde(borrow, default)]
    delta: Option<&'a RawValue>,
    /// An in-band error (a completion stream's `{"error": ...}` event).
    #[serde(borrow, default)]
    error: Option<&'a RawValue>,
    #[serde(borrow, default, rename = "type")]
    kind: Option<&'a RawValue>,
    /// The answer's identity, for a usage chunk the gateway adds (and the
    /// resumable record): there even when `null`.
    #[serde(borrow, default, deserialize_with = "crate::json::present")]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    object: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "crate::json::present")]
    created: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "crate::json::present")]
    model: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ResponseProbe<'a> {
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    usage: Option<&'a RawValue>,
}

/// Whether a Responses stream event of type `kind` ends it, its response
/// saying what served it (`response.completed`, `incomplete`, `failed`).
fn ends_a_response(kind: &str) -> bool {
    matches!(
        kind,
        "response.completed" | "response.incomplete" | "response.failed"
    )
}

/// A struct read with its `service_tier` member kept aside, the last one
/// given (as JSON readers take a repeated key): read as a field, a
/// provider that repeats it in every chunk would have its events dropped
/// as unreadable (a struct's field given twice is an error). Read from an
/// array, as serde reads a struct, it has none.
pub(super) struct Tiered<'a, T> {
    value: T,
    tier: Option<&'a RawValue>,
}

impl<T> std::ops::Deref for Tiered<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.value
    }
}

impl<'de: 'a, 'a, T: Deserialize<'de>> Deserialize<'de> for Tiered<'a, T> {
    fn deserialize<D: serde::Deserializer<'de>>(value: D) -> Result<Self, D::Error> {
        value.deserialize_any(TieredVisitor(std::marker::PhantomData))
    }
}

/// Reads a [`Tiered`].
struct TieredVisitor<'a, T>(std::marker::PhantomData<(&'a (), T)>);

impl<'de: 'a, 'a, T: Deserialize<'de>> serde::de::Visitor<'de> for TieredVisitor<'a, T> {
    type Value = Tiered<'a, T>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        // Only the tier: an `index` or `refusal` here is skipped unread, as
        // before (read aside, its bytes would have to be UTF-8).
        let mut aside = Aside::new(map, true);
        let value = T::deserialize(serde::de::value::MapAccessDeserializer::new(&mut aside))?;
        Ok(Tiered {
            value,
            tier: aside.tier,
        })
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        let value = T::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))?;
        Ok(Tiered { value, tier: None })
    }
}

/// A struct read from a JSON object only (serde reads a struct from an
/// array too, by the order of its fields): a choice or delta that is any
/// other value makes the event malformed, as the resumable record cannot
/// read it either.
///
/// Its `index` and `refusal` members, which only the record's reading
/// needs ([`memo`]), are kept aside rather than read as the struct's
/// fields: a provider that gives one twice has the event passed on, as
/// before they were read (a struct's field given twice is an error), and
/// `twice` says so (the record, which cannot read such an event, then
/// reads it itself).
struct Object<'a, T> {
    value: T,
    index: Option<&'a RawValue>,
    refusal: Option<&'a RawValue>,
    twice: bool,
}

impl<T> std::ops::Deref for Object<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.value
    }
}

impl<'de: 'a, 'a, T: Deserialize<'de>> Deserialize<'de> for Object<'a, T> {
    fn deserialize<D: serde::Deserializer<'de>>(value: D) -> Result<Self, D::Error> {
        value.deserialize_map(ObjectVisitor(std::marker::PhantomData))
    }
}

/// Reads an [`Object`].
struct ObjectVisitor<'a, T>(std::marker::PhantomData<(&'a (), T)>);

impl<'de: 'a, 'a, T: Deserialize<'de>> serde::de::Visitor<'de> for ObjectVisitor<'a, T> {
    type Value = Object<'a, T>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        let mut aside = Aside::new(map, false);
        let value = T::deserialize(serde::de::value::MapAccessDeserializer::new(&mut aside))?;
        Ok(Object {
            value,
            index: aside.index,
            refusal: aside.refusal,
            twice: aside.twice,
        })
    }
}

/// An object's members with `index` and `refusal` kept aside (see
/// [`Object`]), or (`only_tier`) its `service_tier` alone ([`Tiered`]).
struct Aside<'a, A> {
    map: A,
    index: Option<&'a RawValue>,
    refusal: Option<&'a RawValue>,
    twice: bool,
    tier: Option<&'a RawValue>,
    only_tier: bool,
}

impl<A> Aside<'_, A> {
    fn new(map: A, only_tier: bool) -> Self {
        Aside {
            map,
            index: None,
            refusal: None,
            twice: false,
            tier: None,
            only_tier,
        }
    }
}

impl<'de, A: serde::de::MapAccess<'de>> serde::de::MapAccess<'de> for &mut Aside<'de, A> {
    type Error = A::Error;

    fn next_key_seed<K: serde::de::DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        use serde::de::value::{BorrowedStrDeserializer, StringDeserializer};
        loop {
            let Some(key) = self.map.next_key::<Key<'de>>()? else {
                return Ok(None);
            };
            let name = match &key {
                Key::Borrowed(name) => name,
                Key::Owned(name) => name.as_str(),
            };
            let slot = match name {
                "index" if !self.only_tier => &mut self.index,
                "refusal" if !self.only_tier => &mut self.refusal,
                "service_tier" if self.only_tier => {
                    self.tier = Some(self.map.next_value::<&'de RawValue>()?);
                    continue;
                }
                _ => {
                    return match key {
                        Key::Borrowed(name) => seed.deserialize(BorrowedStrDeserializer::new(name)),
                        Key::Owned(name) => seed.deserialize(StringDeserializer::new(name)),
                    }
                    .map(Some)
                }
            };
            let value = self.map.next_value::<&'de RawValue>()?;
            self.twice |= slot.is_some();
            *slot = Some(value);
        }
    }

    fn next_value_seed<V: serde::de::DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, A::Error> {
        self.map.next_value_seed(seed)
    }
}

/// A member's name, borrowed when it has no escapes.
enum Key<'a> {
    Borrowed(&'a str),
    Owned(String),
}

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(name: D) -> Result<Self, D::Error> {
        name.deserialize_str(KeyVisitor)
    }
}

/// Reads a [`Key`].
struct KeyVisitor;

impl<'de> serde::de::Visitor<'de> for KeyVisitor {
    type Value = Key<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a member's name")
    }

    fn visit_borrowed_str<E>(self, name: &'de str) -> Result<Key<'de>, E> {
        Ok(Key::Borrowed(name))
    }

    fn visit_str<E>(self, name: &str) -> Result<Key<'de>, E> {
        Ok(Key::Owned(name.to_owned()))
    }
}

#[derive(Deserialize)]
struct ChoiceProbe<'a> {
    #[serde(borrow, default)]
    delta: Option<Object<'a, MessageProbe<'a>>>,
    #[serde(borrow, default)]
    message: Option<Object<'a, MessageProbe<'a>>>,
    #[serde(borrow, default)]
    text: Option<&'a RawValue>,
    #[serde(borrow, default)]
    finish_reason: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct MessageProbe<'a> {
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
    #[serde(borrow, default)]
    tool_calls: Option<&'a RawValue>,
    #[serde(borrow, default)]
    function_call: Option<&'a RawValue>,
    /// Reasoning streamed before the answer (DeepSeek, vLLM, OpenRouter).
    #[serde(borrow, default)]
    reasoning_content: Option<&'a RawValue>,
    #[serde(borrow, default)]
    reasoning: Option<&'a RawValue>,
}

impl Probe<'_> {
    /// The processing tier a stream's event says the answer was served
    /// at: its own `service_tier` (a chat chunk's), or the response's of a
    /// Responses event that ends the stream (`response.created` and the
    /// like only echo the request's).
    fn tier(&self) -> Option<ServiceTier> {
        let ends = self.event_type().is_some_and(ends_a_response);
        let response = self.response.as_ref().and_then(|r| r.tier).filter(|_| ends);
        self.tier.or(response).and_then(ServiceTier::from_json)
    }

    /// The usage a stream's event reports, with the tier it names.
    fn usage(&self) -> Option<Usage> {
        Some(Usage {
            tier: self.tier(),
            ..self.value.usage()?
        })
    }

    /// The usage a whole JSON answer reports, with the tier of its own
    /// top-level `service_tier` (not one nested in a member).
    fn answer_usage(&self) -> Option<Usage> {
        Some(Usage {
            tier: self.tier.and_then(ServiceTier::from_json),
            ..self.value.usage()?
        })
    }
}

impl ProbeFields<'_> {
    /// Bytes of generated text in this object (quotes and escapes included:
    /// close enough for an estimate).
    fn generated_bytes(&self) -> u64 {
        let raw_len = |v: &Option<&RawValue>| {
            v.map_or(0, |v| {
                if v.get() == "null" {
                    0
                } else {
                    v.get().len() as u64
                }
            })
        };
        self.choices.iter().flatten().fold(
            self.text_delta().map_or(0, |d| raw_len(&Some(d))),
            |sum, c| {
                let message = c.delta.as_ref().or(c.message.as_ref());
                sum + raw_len(&c.text)
                    + message.map_or(0, |m| {
                        raw_len(&m.content)
                            + raw_len(&m.tool_calls)
                            + raw_len(&m.function_call)
                            + raw_len(&m.reasoning_content)
                            + raw_len(&m.reasoning)
                    })
            },
        )
    }

    /// Appends the generated values (text, reasoning, tool calls) as JSON,
    /// each followed by a comma: a sample to count tokens in.
    fn push_generated(&self, sample: &mut Vec<u8>) {
        let mut push = |v: &Option<&RawValue>| {
            if let Some(v) = v.filter(|v| v.get() != "null") {
                sample.extend_from_slice(v.get().as_bytes());
                sample.push(b',');
            }
        };
        push(&self.text_delta());
        for choice in self.choices.iter().flatten() {
            push(&choice.text);
            if let Some(m) = choice.delta.as_ref().or(choice.message.as_ref()) {
                push(&m.content);
                push(&m.tool_calls);
                push(&m.function_call);
                push(&m.reasoning_content);
                push(&m.reasoning);
            }
        }
    }

    /// The event's only generated value, a string in its only choice, when
    /// nothing else in it counts for the meter: no usage (`null` aside), no
    /// finish reason, no Responses event type or response. Whether it is
    /// an error is the caller's to say. (What [`last`] needs to stand it
    /// for the next event.)
    fn only_text(&self) -> Option<&RawValue> {
        let [choice] = self.choices.as_deref()? else {
            return None;
        };
        if self.kind.is_some()
            || self.response.is_some()
            || self.usage.is_some_and(|u| u.get() != "null")
            || choice.finish_reason.is_some_and(|r| r.get() != "null")
        {
            return None;
        }
        let message = choice.delta.as_ref().or(choice.message.as_ref());
        let mut given = [
            choice.text,
            message.and_then(|m| m.content),
            message.and_then(|m| m.tool_calls),
            message.and_then(|m| m.function_call),
            message.and_then(|m| m.reasoning_content),
            message.and_then(|m| m.reasoning),
        ]
        .into_iter()
        .flatten()
        .filter(|v| v.get() != "null");
        let text = given.next()?;
        (given.next().is_none() && text.get().starts_with('"')).then_some(text)
    }

    /// What the resumable record reads of this event, positions in `json`
    /// (the text it was read from), and the span of the error it reads
    /// (see [`memo::leave`]); none for an event of several choices.
    /// `is_error`: what [`Probe::is_error`] says of it (the caller has it).
    fn reading(
        &self,
        json: &[u8],
        is_error: bool,
    ) -> Option<(memo::Reading, Option<Range<usize>>)> {
        let choices = self.choices.as_deref().unwrap_or_default();
        let twice = choices
            .iter()
            .any(|c| c.twice || c.delta.as_ref().is_some_and(|d| d.twice));
        if choices.len() > 1 || twice || !json.trim_ascii_start().starts_with(b"{") {
            return None;
        }
        let base = json.as_ptr() as usize;
        let at = |raw: &RawValue| {
            let start = (raw.get().as_ptr() as usize).checked_sub(base)?;
            let end = start + raw.get().len();
            (end <= json.len()).then_some(start..end)
        };
        let mut identity = [None, None, None];
        for (slot, raw) in identity.iter_mut().zip([self.id, self.created, self.model]) {
            if let Some(raw) = raw {
                *slot = Some(at(raw)?);
            }
        }
        let mut reading = memo::Reading {
            identity,
            ends: is_error,
            content: None,
        };
        if let Some(choice) = choices.first() {
            let delta = choice.delta.as_ref();
            reading.ends |= memo::choice_ends(
                choice.index,
                choice.finish_reason.is_some(),
                delta.is_some_and(|d| d.tool_calls.is_some() || d.function_call.is_some()),
                delta.and_then(|d| d.refusal),
            );
            if let Some(content) = delta.and_then(|d| d.content) {
                if content.get().starts_with('"') {
                    reading.content = Some(at(content)?);
                }
            }
        }
        let guard = match self.error {
            Some(error) => Some(at(error)?),
            None => None,
        };
        Some((reading, guard))
    }

    /// Whether this is a Responses API answer (`"object": "response"`).
    fn is_response(&self) -> bool {
        self.object.is_some_and(|o| o.get() == "\"response\"")
    }

    /// The choices' finish reasons (those that have one).
    fn finish_reasons(&self) -> impl Iterator<Item = String> + '_ {
        self.choices
            .iter()
            .flatten()
            .filter_map(|c| serde_json::from_str(c.finish_reason?.get()).ok())
    }

    /// Whether a choice in this object has finished.
    fn finished(&self) -> bool {
        self.choices
            .iter()
            .flatten()
            .any(|c| c.finish_reason.is_some_and(|r| r.get() != "null"))
    }

    /// Whether the event is the provider's error: an `error` object or
    /// message with something in it (not `null`, `false`, `""` or `{}`,
    /// which some servers put in every chunk), or vLLM's
    /// `"object": "error"`.
    fn is_error(&self) -> bool {
        self.error
            .is_some_and(|error| crate::openai::error_said(error.get()))
            || self.object.is_some_and(|o| crate::json::is_str(o, "error"))
    }

    /// Whether the event has a `usage` object, readable or not.
    fn has_usage_object(&self) -> bool {
        self.usage.is_some_and(|u| u.get().starts_with('{'))
    }

    /// The usage the object reports (its tier is the wrapper's to add:
    /// [`Tiered`]).
    fn usage(&self) -> Option<Usage> {
        match (self.usage, &self.response) {
            (Some(usage), _) => reported_usage(usage),
            (None, Some(response)) => reported_usage(response.usage?),
            (None, None) => None,
        }
    }

    /// A Responses API event's `type` (`response.completed`, ...).
    pub(super) fn event_type(&self) -> Option<&str> {
        self.kind
            .and_then(|k| k.get().strip_prefix('"')?.strip_suffix('"'))
    }

    /// The text a Responses API delta event carries (output text,
    /// function-call arguments, reasoning), as raw JSON.
    fn text_delta(&self) -> Option<&RawValue> {
        let kind = self.event_type()?;
        (kind.ends_with(".delta") && kind.starts_with("response."))
            .then_some(self.delta?)
            .filter(|d| d.get().starts_with('"'))
    }

    /// A Responses API event's response id.
    pub(super) fn response_id(&self) -> Option<&str> {
        let id = self.response.as_ref()?.id?.get();
        id.strip_prefix('"')?.strip_suffix('"')
    }
}

/// A `usage` value as the provider reported it; `None` unless it is an
/// object with sane numbers (serde would also read a struct from an array,
/// field by field).
fn reported_usage(raw: &RawValue) -> Option<Usage> {
    let raw = raw.get();
    if !raw.starts_with('{') {
        return None;
    }
    serde_json::from_str::<UsageWire>(raw).ok()?.into_usage()
}

/// The end of a JSON body kept to read its `usage` from when the body is
/// too large to keep whole ([`MAX_METERED_JSON_BYTES`]): providers put it
/// last.
pub const JSON_TAIL_BYTES: usize = 64 * 1024;

/// The `usage` member found in the end of an event too large to hold
/// (an SSE event's data, where the usage may be nested, as in a Responses
/// stream's `response.completed`): the last `"usage":` followed by a whole
/// JSON object.
pub(crate) fn usage_member_in_tail(tail: &[u8]) -> Option<&RawValue> {
    usage_members_in_tail(tail).next().map(|(usage, _)| usage)
}

/// The `usage` member of the top-level object in the end of a JSON body
/// too large to parse whole (its last 64 KiB, where providers put it):
/// the last `"usage":` with a whole object as its value and after it only
/// the object's other members, its `}` and whitespace, so the object that
/// closes at the body's end is the one it belongs to. A `usage` nested in
/// some other member is not the answer's, as a whole parse would not
/// take it.
pub(crate) fn usage_member_in_json_tail(tail: &[u8]) -> Option<&RawValue> {
    usage_and_tier_in_json_tail(tail).map(|(usage, _)| usage)
}

/// [`usage_member_in_json_tail`], with the last `service_tier` among the
/// members after it ([`closing_members`]).
fn usage_and_tier_in_json_tail(tail: &[u8]) -> Option<(&RawValue, Option<&RawValue>)> {
    usage_members_in_tail(tail).find_map(|(usage, after)| Some((usage, closing_members(after)?)))
}

/// The `"usage":` members in `tail` whose values are whole JSON objects,
/// last first, each with the bytes after its value. An occurrence that is
/// not a key (in a string, or a value of its own) is passed over; at most
/// [`USAGE_TRIES`] values are read, so a tail full of them stays cheap.
fn usage_members_in_tail(tail: &[u8]) -> impl Iterator<Item = (&RawValue, &[u8])> {
    let mut end = tail.len();
    let mut tries = 0;
    std::iter::from_fn(move || {
        while tries < USAGE_TRIES {
            let at = LAST_USAGE_KEY.rfind(&tail[..end])?;
            end = at;
            // After an escaped quote: inside a string, not a key.
            if at > 0 && tail[at - 1] == b'\\' {
                continue;
            }
            let Some(mut rest) = json_ws(&tail[at + USAGE_KEY.len()..]).strip_prefix(b":") else {
                continue;
            };
            tries += 1;
            if let Some(usage) = next_json_value(&mut rest).filter(|raw| raw.get().starts_with('{'))
            {
                return Some((usage, rest));
            }
        }
        None
    })
}

/// How many `"usage":` values a tail's reader reads before it gives up
/// (a nested `usage` after the answer's own costs one).
const USAGE_TRIES: usize = 64;

/// A `usage` key as providers write it.
const USAGE_KEY: &[u8] = b"\"usage\"";
/// A `service_tier` key as providers write it.
const TIER_KEY: &[u8] = b"\"service_tier\"";
// Searchers built once: their set-up costs more than a short body's search.
static LAST_USAGE_KEY: LazyLock<FinderRev<'static>> = LazyLock::new(|| FinderRev::new(USAGE_KEY));
static FIRST_USAGE_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(USAGE_KEY));
static UNICODE_ESCAPE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\\u"));

/// The usage reported in the end of an SSE event too large to hold.
pub fn reported_usage_in_tail(tail: &[u8]) -> Option<Usage> {
    usage_member_in_tail(tail).and_then(reported_usage)
}

/// The usage the top-level object reports in the end of a JSON body too
/// large to parse whole ([`usage_member_in_json_tail`]), with the tier a
/// `service_tier` among the members after it names (a chat completion's
/// place for it; one before the usage cannot be told from a nested one).
pub fn reported_usage_in_json_tail(tail: &[u8]) -> Option<Usage> {
    let (usage, tier) = usage_and_tier_in_json_tail(tail)?;
    Some(Usage {
        tier: tier.and_then(ServiceTier::from_json),
        ..reported_usage(usage)?
    })
}

/// The dearest tier a `"service_tier"` member names in the end of an event
/// too long to hold (`flex`, a discount, never: a client's `metadata`
/// echoed there may name it, and what the answer's own member says cannot
/// be told apart in a tail). Used where the answer's tier would otherwise
/// be lost, so that it is never billed below what it names.
pub(crate) fn dearest_tier_in_tail(tail: &[u8]) -> Option<ServiceTier> {
    let rank = |tier: &ServiceTier| match tier {
        ServiceTier::Flex => 0,
        ServiceTier::Default => 1,
        ServiceTier::Scale => 2,
        ServiceTier::Priority => 3,
    };
    memchr::memmem::find_iter(tail, TIER_KEY)
        .filter_map(|at| {
            let mut value = json_ws(&tail[at + TIER_KEY.len()..]).strip_prefix(b":")?;
            ServiceTier::from_json(next_json_value(&mut value)?)
        })
        .filter(|tier| *tier != ServiceTier::Flex)
        .max_by_key(rank)
}

/// The usage a complete JSON response body reports, if any. Read from the
/// body's end when the one `"usage"` in it is a member of the top-level
/// object there (providers put it last); otherwise the whole body is gone
/// through, everything but `usage` skipped unread.
pub fn reported_usage_in_json(body: &[u8]) -> Option<Usage> {
    let member = match top_level_usage_value_at_end(body) {
        Some(value) => {
            // Nearly always an object: read as the usage at once, in one
            // pass (the general way reads it twice, as a JSON value and
            // then as the usage).
            if let Some(read) = usage_object_closing_the_body(value) {
                return read;
            }
            top_level_usage_at_end_from(value)
        }
        None => None,
    };
    reported_usage(member.unwrap_or_else(|| usage_member_parsed(body))?)
}

/// [`reported_usage`] of the object `value` begins with, when after it
/// only the body's end follows ([`closes_the_body`]); `None` when that
/// cannot be told this way (another value, an object the usage cannot be
/// read from, bytes that are not UTF-8 in it), for the general way to
/// decide.
fn usage_object_closing_the_body(value: &[u8]) -> Option<Option<Usage>> {
    if !value.starts_with(b"{") {
        return None;
    }
    let mut objects = serde_json::Deserializer::from_slice(value).into_iter::<UsageWire>();
    let wire = objects.next()?.ok()?;
    let (object, rest) = value.split_at(objects.byte_offset());
    // A string skipped unread is not checked for UTF-8, which the general
    // way (a `RawValue`) requires.
    if !object.is_ascii() && std::str::from_utf8(object).is_err() {
        return None;
    }
    // The members after it are walked anyway: the answer's tier, when it
    // comes after its usage (as OpenAI writes a chat completion), is read
    // there at no cost.
    let tier = closing_members(rest)?;
    Some(wire.into_usage().map(|usage| Usage {
        tier: tier.and_then(ServiceTier::from_json),
        ..usage
    }))
}

/// The top-level `usage` member's value of a JSON object (with what
/// follows it), found from the end of `body` without reading what comes
/// before it; `None` when it cannot be told this way.
///
/// Outside strings only: inside a JSON string a `"` is escaped, so the
/// bytes `"usage"` (a quote right after the `e`) cannot occur there, and
/// in valid JSON an unescaped quote before `usage` opens the key. The key
/// must be the only `"usage"` in the body (an earlier one is a nested or
/// a repeated key: a whole parse decides), with no `\u` escape before it
/// (a key written `"\u0075sage"` is `usage` too), and after its value only the
/// object's other members, its `}` and whitespace may follow: the object
/// that closes at the body's end is the top-level one. For every valid
/// body the answer is the whole parse's (a unit property test holds it to
/// that). A body that does not begin as an object (a byte-order mark,
/// junk, a missing start) is left to the whole parse; one malformed
/// between its start and its `usage` is billed by the usage it reports.
fn top_level_usage_value_at_end(body: &[u8]) -> Option<&[u8]> {
    if json_ws(body).first() != Some(&b'{') {
        return None;
    }
    let at = LAST_USAGE_KEY.rfind(body)?;
    let before = &body[..at];
    if before.last() == Some(&b'\\')
        || FIRST_USAGE_KEY.find(before).is_some()
        || UNICODE_ESCAPE.find(before).is_some()
    {
        return None;
    }
    json_ws(&body[at + USAGE_KEY.len()..]).strip_prefix(b":")
}

/// The usage member from [`top_level_usage_value_at_end`]'s value, when
/// only the body's end follows it: `Some(None)` for `"usage": null`.
fn top_level_usage_at_end_from(mut rest: &[u8]) -> Option<Option<&RawValue>> {
    let usage = next_json_value(&mut rest)?;
    closes_the_body(rest).then(|| (usage.get() != "null").then_some(usage))
}

/// The processing tier a whole JSON answer says it was served at: its
/// top-level `service_tier`, the last one when repeated, however its name
/// is escaped (one nested in another member, such as a Responses answer's
/// echoed `metadata`, is not the answer's). `None` when there is none, it
/// names no tier the gateway knows, or the body cannot be read as an
/// object. Reads the whole body: asked only when the price depends on it.
pub fn reported_tier_in_json(body: &[u8]) -> Option<ServiceTier> {
    let answer = serde_json::from_slice::<Tiered<serde::de::IgnoredAny>>(body).ok()?;
    ServiceTier::from_json(answer.tier?)
}

/// The `usage` member of a whole JSON body, by parsing all of it.
fn usage_member_parsed(body: &[u8]) -> Option<&RawValue> {
    #[derive(Deserialize)]
    struct UsageOnly<'a> {
        #[serde(borrow, default)]
        usage: Option<&'a RawValue>,
    }
    serde_json::from_slice::<UsageOnly>(body).ok()?.usage
}

/// The top-level `usage` member of a JSON object, found from the end
/// ([`top_level_usage_value_at_end`]): `Some(None)` for `"usage": null`,
/// `None` when it cannot be told this way.
#[cfg(test)]
fn top_level_usage_at_end(body: &[u8]) -> Option<Option<&RawValue>> {
    top_level_usage_at_end_from(top_level_usage_value_at_end(body)?)
}

/// Whether `rest` (what follows a member's value) is only the object's
/// other members, its `}` and whitespace: the member belongs to the object
/// that closes at the body's end. False for anything else and for
/// another `usage` (a repeated key, however its name is written).
fn closes_the_body(rest: &[u8]) -> bool {
    closing_members(rest).is_some()
}

/// [`closes_the_body`], with the last `service_tier` among those members
/// (`Some(None)`: they close the body, and name none).
fn closing_members(mut rest: &[u8]) -> Option<Option<&RawValue>> {
    let mut tier = None;
    loop {
        rest = json_ws(rest);
        match rest.split_first() {
            Some((b'}', after)) => return json_ws(after).is_empty().then_some(tier),
            Some((b',', members)) => {
                rest = json_ws(members);
                let key = next_json_value(&mut rest)?.get();
                if !key.starts_with('"') {
                    return None;
                }
                // Escapes (`"\u0075sage"` is `usage` too): read it.
                let (is_usage, is_tier) = match key.contains('\\') {
                    true => match serde_json::from_str::<String>(key) {
                        Ok(key) => (key == "usage", key == "service_tier"),
                        Err(_) => return None,
                    },
                    false => (key.as_bytes() == USAGE_KEY, key.as_bytes() == TIER_KEY),
                };
                if is_usage {
                    return None;
                }
                rest = json_ws(rest).strip_prefix(b":")?;
                let value = next_json_value(&mut rest)?;
                if is_tier {
                    tier = Some(value);
                }
            }
            _ => return None,
        }
    }
}

/// The top-level members of a JSON object from its start, each key (its
/// text, escapes read) with its value, as far as they can be read: a body
/// cut short (the first 16 MiB of a larger answer) yields the members
/// before the cut, and a caller looking for the first few stops early.
pub(crate) fn leading_members(body: &[u8]) -> impl Iterator<Item = (String, &RawValue)> {
    let mut rest = json_ws(body).strip_prefix(b"{");
    let mut first = true;
    std::iter::from_fn(move || {
        let mut bytes = json_ws(rest.take()?);
        if !std::mem::take(&mut first) {
            bytes = json_ws(bytes.strip_prefix(b",")?);
        }
        let key = next_json_value(&mut bytes)?;
        let key = serde_json::from_str::<String>(key.get()).ok()?;
        let mut bytes = json_ws(bytes).strip_prefix(b":")?;
        let value = next_json_value(&mut bytes)?;
        rest = Some(bytes);
        Some((key, value))
    })
}

/// `bytes` past JSON's whitespace.
fn json_ws(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !matches!(b, b' ' | b'\n' | b'\r' | b'\t'))
        .unwrap_or(bytes.len());
    &bytes[start..]
}

/// The JSON value at the start of `bytes` (after whitespace), advancing
/// `bytes` past it.
fn next_json_value<'a>(bytes: &mut &'a [u8]) -> Option<&'a RawValue> {
    let mut values = serde_json::Deserializer::from_slice(bytes).into_iter::<&RawValue>();
    let value = values.next()?.ok()?;
    *bytes = &bytes[values.byte_offset()..];
    Some(value)
}

/// Usage from a complete JSON response body; estimated from the generated
/// text (and `prompt_estimate`) when the provider sent none.
pub fn usage_from_json(body: &[u8], prompt_estimate: u64) -> Usage {
    // The common case first: a body with `usage`. Only a body without it
    // is probed for its generated text.
    if let Some(usage) = reported_usage_in_json(body) {
        return usage;
    }
    match serde_json::from_slice::<Probe>(body) {
        Ok(probe) => probe.answer_usage().unwrap_or(Usage {
            prompt_tokens: prompt_estimate,
            completion_tokens: probe.generated_bytes().div_ceil(4),
            cached_tokens: 0,
            estimated: true,
            tier: probe.tier.and_then(ServiceTier::from_json),
            ..Default::default()
        }),
        Err(_) => Usage {
            prompt_tokens: prompt_estimate,
            completion_tokens: (body.len() as u64).div_ceil(4),
            cached_tokens: 0,
            estimated: true,
            ..Default::default()
        },
    }
}

/// Usage from a complete JSON response body; when the provider sent none,
/// the gateway's count: the prompt with `estimate`, the generated text
/// with `model`'s encoding.
pub fn usage_from_json_counted(body: &[u8], estimate: &Estimate, model: &str) -> Usage {
    let reported = usage_from_json(body, 0);
    if !reported.estimated {
        return reported;
    }
    let mut sample = Vec::new();
    let generated = match serde_json::from_slice::<Probe>(body) {
        Ok(probe) => {
            probe.push_generated(&mut sample);
            if probe.is_response() {
                push_response_output(body, &mut sample);
            }
            sample_text(&sample)
        }
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    };
    Usage {
        prompt_tokens: estimate.prompt_tokens(model),
        completion_tokens: estimate.completion_tokens_of(model, &generated),
        cached_tokens: 0,
        estimated: true,
        ..Default::default()
    }
}

/// Appends what a Responses API answer's output items generated, each
/// value as JSON followed by a comma: text (of messages, refusals,
/// reasoning and its summaries, audio transcripts), tool-call arguments and
/// inputs, code, commands and queries, however the items nest them. What an
/// item holds but the model did not write out as text (tool results, image
/// data, encrypted reasoning, citations) is not counted: the provider's
/// usage, when it sends one, covers those. Read only when the answer
/// reports no usage, from a tree of the body (a repeated key is no error).
fn push_response_output(body: &[u8], sample: &mut Vec<u8>) {
    if let Ok(Value::Object(answer)) = serde_json::from_slice::<Value>(body) {
        if let Some(output) = answer.get("output") {
            push_output(output, sample);
        }
    }
}

/// [`push_response_output`] for a Responses stream's final event
/// (`response.completed`), whose `response` carries the output.
fn push_response_event_output(event: &[u8], sample: &mut Vec<u8>) {
    if let Ok(event) = serde_json::from_slice::<Value>(event) {
        if let Some(output) = event.get("response").and_then(|r| r.get("output")) {
            push_output(output, sample);
        }
    }
}

/// What an answer's `output` generated ([`push_response_output`]).
fn push_output(output: &Value, sample: &mut Vec<u8>) {
    match output {
        // Not the API's shape, but text all the same.
        Value::String(_) => push_value(output, sample),
        _ => push_generated_values(output, None, sample),
    }
}

/// Keys whose values an output item's model generated.
const GENERATED_KEYS: [&str; 10] = [
    "text",
    "refusal",
    "content",
    "transcript",
    "arguments",
    "input",
    "code",
    "command",
    "query",
    "queries",
];

/// Keys of what an output item holds but its model did not write.
const NOT_GENERATED_KEYS: [&str; 8] = [
    "result",
    "results",
    "output",
    "outputs",
    "encrypted_content",
    "annotations",
    "logprobs",
    "sources",
];

/// [`push_response_output`]'s walk: strings under a generated key (and a
/// tool call's arguments or input written as an object), anything else
/// searched, what no model wrote skipped.
fn push_generated_values(value: &Value, key: Option<&str>, sample: &mut Vec<u8>) {
    let generated = key.is_some_and(|k| GENERATED_KEYS.contains(&k));
    let tool_call = matches!(key, Some("arguments" | "input"));
    match value {
        Value::String(_) if generated => push_value(value, sample),
        Value::Object(_) if tool_call => push_value(value, sample),
        Value::Object(map) => {
            for (name, member) in map {
                if !NOT_GENERATED_KEYS.contains(&name.as_str()) {
                    push_generated_values(member, Some(name), sample);
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                push_generated_values(item, key, sample);
            }
        }
        _ => {}
    }
}

/// Appends `value` as JSON and a comma (a sample for [`sample_text`]).
fn push_value(value: &Value, sample: &mut Vec<u8>) {
    if serde_json::to_writer(&mut *sample, value).is_ok() {
        sample.push(b',');
    }
}

mod last;
mod media;
pub(crate) mod memo;
mod stream;
#[cfg(test)]
mod tests;
mod tokens;

pub use media::Media;
pub(crate) use stream::{line_end, lines, rest_of_line_end, SAMPLE_BYTES};
pub use stream::{media_event, StreamMeter};
pub use tokens::{sample_text, Encoding, Estimate};
