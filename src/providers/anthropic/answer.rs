//! A Messages API answer (or error) as an OpenAI chat completion (or error).

use super::request::STRUCTURED_TOOL;
use crate::cost::{Estimate, ServiceTier, Usage};
use crate::openai::ApiError;
use serde_json::{json, Value};

/// Anthropic `stop_reason` as an OpenAI `finish_reason`.
pub(super) fn finish_reason(stop_reason: Option<&str>) -> Option<&'static str> {
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
///
/// `None` when it reports nothing the gateway can bill by: not an object,
/// no `output_tokens` (nor `input_tokens` when `whole`: an answer's or a
/// stream's start; a stream's final delta may leave it out), or a count
/// that is not a whole number of tokens a request could use (null,
/// negative, fractional, past [`crate::cost::MAX_REPORTED_TOKENS`], or
/// prompt counts whose sum is past it); then
/// the gateway counts, as it does for an OpenAI-format answer.
pub(super) fn usage_of(usage: &Value, whole: bool) -> Option<Usage> {
    let usage = usage.as_object()?;
    let count = |v: &Value| {
        v.as_u64()
            .filter(|&n| n <= crate::cost::MAX_REPORTED_TOKENS)
    };
    // Cache counts may be left out or null; the others must be there.
    let optional = |key: &str| match usage.get(key) {
        None | Some(Value::Null) => Some(0),
        Some(v) => count(v),
    };
    let required = |key: &str| usage.get(key).and_then(count);
    let input = if whole {
        required("input_tokens")?
    } else {
        optional("input_tokens")?
    };
    let cache_read = optional("cache_read_input_tokens")?;
    // Each count under the bound, their sum too.
    let prompt_tokens = input + cache_read + optional("cache_creation_input_tokens")?;
    if prompt_tokens > crate::cost::MAX_REPORTED_TOKENS {
        return None;
    }
    Some(Usage {
        prompt_tokens,
        completion_tokens: required("output_tokens")?,
        cached_tokens: cache_read,
        estimated: false,
        tier: reported_tier(usage),
        ..Default::default()
    })
}

/// The tier a usage report says the answer was served at: `standard` or
/// `priority` (Anthropic's Priority Tier); `batch` and the rest are none.
pub(super) fn reported_tier(usage: &serde_json::Map<String, Value>) -> Option<ServiceTier> {
    let tier = usage.get("service_tier")?.as_str()?;
    ServiceTier::from_name(tier)
}

/// The prompt's counts in a usage report whose completion count is left
/// out (or null): a stream's start carries only a placeholder for it, and
/// some answers none. `None` when the prompt's counts are not usable, or
/// when a completion count is there but not usable (then none of the
/// report is taken).
pub(super) fn prompt_of(usage: &Value) -> Option<Usage> {
    let mut usage = usage.as_object()?.clone();
    let output = usage.entry("output_tokens").or_insert(Value::Null);
    if output.is_null() {
        *output = json!(0);
    }
    usage_of(&Value::Object(usage), true)
}

/// The gateway's count of an answer whose provider reported no usage to
/// bill by: the prompt's reported counts when they came usable
/// (`reported_prompt`, see [`prompt_of`]), else `estimate`'s; the generated
/// text `sample` and the `unsampled` bytes beyond it as `model`'s encoding
/// counts them (without an estimate, bytes / 4 and no prompt).
pub(super) fn counted(
    reported_prompt: Option<&Usage>,
    estimate: Option<(&Estimate, &str)>,
    sample: &str,
    unsampled: u64,
) -> Usage {
    let (prompt_tokens, completion_tokens) = match estimate {
        Some((estimate, model)) => (
            reported_prompt.map_or_else(|| estimate.prompt_tokens(model), |u| u.prompt_tokens),
            if unsampled == 0 {
                estimate.completion_tokens_of(model, sample)
            } else {
                estimate.completion_tokens(model, sample, unsampled)
            },
        ),
        None => (
            reported_prompt.map_or(0, |u| u.prompt_tokens),
            (sample.len() as u64 + unsampled).div_ceil(4),
        ),
    };
    Usage {
        prompt_tokens,
        cached_tokens: reported_prompt.map_or(0, |u| u.cached_tokens),
        completion_tokens,
        estimated: true,
        ..Default::default()
    }
}

/// Usage as an OpenAI answer's `usage` member.
pub fn usage_json(usage: &Usage) -> Value {
    json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total(),
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    })
}

pub(super) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Translates a Messages API answer into a `chat.completion`, with its
/// usage: the provider's report when it gave one to bill by, else the
/// gateway's count by `estimate` (see [`counted`]; `model`'s encoding
/// should be loaded), of the text, tool inputs and thinking the model
/// generated. The answer's `usage` is what is billed, either way.
pub fn to_chat_completion(
    body: &[u8],
    public_model: &str,
    estimate: &Estimate,
    model: &str,
) -> Result<(Vec<u8>, Usage), ApiError> {
    let message: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::upstream_error(format!("The provider answered with invalid JSON: {e}"))
    })?;
    match message["type"].as_str() {
        None | Some("message") => {}
        // An error (or anything else) under a 200 is no answer: the
        // deployment failed.
        Some("error") => return Err(to_openai_error(502, body)),
        Some(other) => {
            return Err(ApiError::upstream_error(format!(
                "The provider answered 200 with a '{other}', not a message."
            )))
        }
    }
    // A message has its content (perhaps none: `[]`); `null` or `{}` is no
    // answer, not an empty one.
    if !message["content"].is_array() {
        return Err(ApiError::upstream_error(
            "The provider answered 200 without a message's content.",
        ));
    }
    let mut text = String::new();
    let mut tool_calls = Vec::new();
    let mut structured = false;
    // What the model generated, in the order a stream of it would be
    // counted: thinking is billed as output, though the chat format has
    // no place for it.
    let mut generated = String::new();
    for block in message["content"].as_array().into_iter().flatten() {
        match block["type"].as_str() {
            Some("text") => {
                let piece = block["text"].as_str().unwrap_or_default();
                text.push_str(piece);
                generated.push_str(piece);
            }
            Some("thinking") => generated.push_str(block["thinking"].as_str().unwrap_or_default()),
            // A JSON response_format's forced tool: its input is the answer.
            Some("tool_use") if block["name"] == STRUCTURED_TOOL => {
                structured = true;
                text = block["input"].to_string();
                generated.push_str(&text);
            }
            Some("tool_use") => {
                let arguments = block["input"].to_string();
                generated.push_str(&arguments);
                tool_calls.push(json!({
                    "id": block["id"],
                    "type": "function",
                    "function": {"name": block["name"], "arguments": arguments},
                }));
            }
            _ => {}
        }
    }
    let usage = usage_of(&message["usage"], true).unwrap_or_else(|| Usage {
        // Counted, but at the tier it says, whatever its counts.
        tier: message["usage"].as_object().and_then(reported_tier),
        ..counted(
            prompt_of(&message["usage"]).as_ref(),
            Some((estimate, model)),
            &generated,
            0,
        )
    });
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
            "finish_reason": match finish_reason(message["stop_reason"].as_str()) {
                Some("tool_calls") if structured => Some("stop"),
                other => other,
            },
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
        // Anthropic says a prompt does not fit in words: "prompt is too
        // long: 210000 tokens > 200000 maximum", or "input length and
        // `max_tokens` exceed context limit: 199759 + 8192 > 200000".
        (400, _)
            if message.contains("prompt is too long")
                || message.contains("exceed context limit")
                || message.contains("context window") =>
        {
            ApiError::context_length_exceeded(message.clone())
        }
        (400, _) | (_, Some("invalid_request_error")) => ApiError::bad_request(message.clone()),
        (429, _) | (_, Some("rate_limit_error")) => ApiError::provider_rate_limited("anthropic"),
        _ => ApiError::upstream_error(message.clone()),
    };
    error.message = message.into_boxed_str();
    error
}
