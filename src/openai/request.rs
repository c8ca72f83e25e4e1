//! Reading a request body: the few fields routing and accounting need,
//! borrowed without copying the rest, and the limits every body must keep.

use super::ApiError;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;

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
    #[serde(borrow, default, deserialize_with = "crate::json::present")]
    stream_options: Option<&'a RawValue>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    max_output_tokens: Option<u64>,
    #[serde(borrow, default)]
    previous_response_id: Option<Cow<'a, str>>,
    #[serde(default)]
    background: Option<bool>,
    #[serde(borrow, default)]
    conversation: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "crate::json::present")]
    api_key: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "crate::json::present")]
    api_base: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "crate::json::present")]
    base_url: Option<&'a RawValue>,
    #[serde(borrow, default)]
    messages: Option<&'a RawValue>,
    #[serde(borrow, default)]
    n: Option<&'a RawValue>,
    #[serde(borrow, default)]
    input: Option<&'a RawValue>,
    #[serde(borrow, default)]
    logprobs: Option<&'a RawValue>,
    #[serde(borrow, default)]
    service_tier: Option<&'a RawValue>,
    /// Sampling fields are only type-checked: a provider that answers a
    /// string here with a 500 would count a client's mistake against the
    /// deployment's breaker (OpenAI answers 400).
    #[serde(default, rename = "temperature")]
    _temperature: Option<f64>,
    #[serde(default, rename = "top_p")]
    _top_p: Option<f64>,
    #[serde(default, rename = "frequency_penalty")]
    _frequency_penalty: Option<f64>,
    #[serde(default, rename = "presence_penalty")]
    _presence_penalty: Option<f64>,
    #[serde(default, rename = "seed")]
    _seed: Option<i64>,
    #[serde(default, rename = "top_logprobs")]
    _top_logprobs: Option<u64>,
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
    /// `max_completion_tokens`, or else `max_tokens` (`max_output_tokens`
    /// in the Responses API).
    pub max_tokens: Option<u64>,
    /// The Responses API's `previous_response_id`.
    pub previous_response_id: Option<Cow<'a, str>>,
    /// The Responses API's `background: true` (answered queued, without
    /// usage).
    pub background: bool,
    /// The Responses API's `conversation` (a conversation the provider
    /// account keeps).
    pub names_conversation: bool,
    /// The body carries fields that name another upstream or key
    /// (`api_key`, `api_base`, `base_url`): they are removed before
    /// forwarding and never honoured.
    pub has_foreign_upstream_fields: bool,
    /// `messages`, when present, is a JSON array (its items are the
    /// provider's to check).
    pub messages_is_array: Option<bool>,
    /// `n` as given (images asked for, choices): its raw JSON, unread.
    pub n: Option<&'a str>,
    /// `input` as given (text to speak, a prompt): its raw JSON, unread.
    pub input: Option<&'a str>,
    /// One choice without log probabilities (`n` absent or 1, `logprobs`
    /// absent or false): an answer a broken stream can be continued into.
    pub one_plain_choice: bool,
    /// `service_tier` as given (`null` is none): its raw JSON, unread.
    pub service_tier: Option<&'a str>,
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
                let duplicate = inner
                    .to_string()
                    .strip_prefix("duplicate field `")
                    .and_then(|rest| rest.split_once('`'))
                    .map(|(field, _)| field.to_owned());
                use serde_json::error::Category;
                match (inner.classify(), duplicate) {
                    // Which of two the provider would read is its own
                    // business: a field the gateway reads is given once.
                    (Category::Data, Some(field)) => {
                        ApiError::invalid_field(&field, "given more than once")
                    }
                    (Category::Data, None) if path != "." => ApiError::invalid_field(&path, inner),
                    (Category::Data, None) => ApiError::bad_request(format!(
                        "The request body must be a JSON object: {inner}"
                    )),
                    (_, _) => ApiError::invalid_json(inner),
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
            max_tokens: raw
                .max_completion_tokens
                .or(raw.max_tokens)
                .or(raw.max_output_tokens),
            previous_response_id: raw.previous_response_id,
            background: raw.background.unwrap_or(false),
            names_conversation: raw.conversation.is_some_and(|c| c.get() != "null"),
            has_foreign_upstream_fields: raw.api_key.is_some()
                || raw.api_base.is_some()
                || raw.base_url.is_some(),
            messages_is_array: raw.messages.map(|m| m.get().starts_with('[')),
            n: raw.n.map(RawValue::get),
            input: raw.input.map(RawValue::get),
            one_plain_choice: raw.n.is_none_or(|n| matches!(n.get(), "1" | "null"))
                && raw
                    .logprobs
                    .is_none_or(|l| matches!(l.get(), "false" | "null")),
            service_tier: raw
                .service_tier
                .map(RawValue::get)
                .filter(|tier| *tier != "null"),
        })
    }
}

impl<'a> RequestFields<'a> {
    /// The fields of a multipart upload: its model, whether it streams.
    pub fn for_form(form: &'a super::Form) -> Self {
        RequestFields {
            model: Cow::Borrowed(&form.model),
            model_span: (0, 0),
            stream: form.stream,
            stream_options: None,
            stream_options_span: None,
            max_tokens: None,
            previous_response_id: None,
            background: false,
            names_conversation: false,
            has_foreign_upstream_fields: false,
            messages_is_array: None,
            n: None,
            input: None,
            one_plain_choice: false,
            service_tier: None,
        }
    }
}

impl RequestFields<'_> {
    /// The processing tier the request asks for: `None` when it leaves
    /// the choice to the provider (`auto`, or no `service_tier`) or names
    /// a tier the gateway does not know.
    pub fn requested_tier(&self) -> Option<crate::cost::ServiceTier> {
        let tier = serde_json::from_str::<String>(self.service_tier?).ok()?;
        crate::cost::ServiceTier::asked(&tier)
    }

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
