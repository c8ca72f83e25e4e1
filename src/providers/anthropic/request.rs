//! An OpenAI chat completions request as a Messages API request.

use super::{invalid, DEFAULT_MAX_TOKENS};
use crate::openai::ApiError;
use serde_json::{json, Map, Value};

/// The tool a JSON `response_format` becomes (forced, its input the JSON
/// answer); a client's own tool may not take the name.
pub const STRUCTURED_TOOL: &str = "runestone_structured_output";

/// Every chat completions request field and what reaches Anthropic of it
/// (the README's table is this list). A field outside it is not OpenAI's
/// and is passed on as it is (Anthropic's own, such as `top_k` or
/// `thinking`); a refused one is a 400 naming it.
pub const FIELDS: &[(&str, &str)] = &[
    ("model", "routed; the target's model is sent"),
    ("messages", "translated: system/developer to `system`, tool results to `tool_result` blocks, assistant tool calls to `tool_use`, images to `image` blocks"),
    ("max_tokens", "translated to `max_tokens` (default 4096)"),
    ("max_completion_tokens", "translated to `max_tokens` (before `max_tokens`)"),
    ("temperature", "translated; above 1 refused (Anthropic's range is 0-1)"),
    ("top_p", "translated"),
    ("stop", "translated to `stop_sequences`"),
    ("stream", "translated; the stream is translated event by event"),
    ("stream_options", "`include_usage` honoured (a usage chunk)"),
    ("tools", "function tools translated; other tool types refused"),
    ("tool_choice", "translated (`auto`, `none`, `required` to `any`, a named function to `tool`)"),
    ("parallel_tool_calls", "`false` translated to `disable_parallel_tool_use`"),
    ("response_format", "`json_schema` and `json_object` translated to a forced tool whose input is the answer; refused together with `tools`"),
    ("user", "translated to `metadata.user_id`"),
    ("safety_identifier", "translated to `metadata.user_id`"),
    ("n", "1 accepted; more refused"),
    ("logprobs", "`false` accepted; `true` refused"),
    ("top_logprobs", "refused"),
    ("seed", "refused"),
    ("frequency_penalty", "0 accepted; other values refused"),
    ("presence_penalty", "0 accepted; other values refused"),
    ("logit_bias", "empty accepted; otherwise refused"),
    ("reasoning_effort", "refused (use Anthropic's `thinking`, passed on as it is)"),
    ("verbosity", "refused"),
    ("store", "`false` accepted; `true` refused"),
    ("metadata", "refused"),
    (
        "service_tier",
        "`auto` accepted; `default` translated to `standard_only` (no Priority Tier); others refused",
    ),
    ("modalities", "`[\"text\"]` accepted; others refused"),
    ("audio", "refused"),
    ("prediction", "refused"),
    ("web_search_options", "refused"),
    ("prompt_cache_key", "refused"),
    ("functions", "refused (use `tools`)"),
    ("function_call", "refused (use `tool_choice`)"),
];

/// Refuses the fields Anthropic cannot honour as asked.
fn refuse_unsupported(request: &Map<String, Value>) -> Result<(), ApiError> {
    for (key, value) in request {
        let accepted = match key.as_str() {
            "n" => value.is_null() || value == &json!(1),
            "logprobs" | "store" => value.is_null() || value == &json!(false),
            "frequency_penalty" | "presence_penalty" => {
                value.is_null() || value.as_f64() == Some(0.0)
            }
            "logit_bias" => value.is_null() || value.as_object().is_some_and(Map::is_empty),
            "service_tier" => value.is_null() || matches!(value.as_str(), Some("auto" | "default")),
            "modalities" => value.is_null() || value == &json!(["text"]),
            "temperature" => value.is_null() || value.as_f64().is_some_and(|t| t <= 1.0),
            "top_logprobs" | "seed" | "reasoning_effort" | "verbosity" | "metadata" | "audio"
            | "prediction" | "web_search_options" | "prompt_cache_key" | "functions"
            | "function_call" => value.is_null(),
            _ => true,
        };
        if !accepted {
            let why = FIELDS
                .iter()
                .find(|(name, _)| name == key)
                .map_or("refused", |(_, why)| why);
            return Err(invalid(
                key,
                &format!("'{key}' cannot be honoured by this model (an Anthropic model): {why}"),
            ));
        }
    }
    Ok(())
}

/// Translates an OpenAI chat completions body into a Messages API body for
/// `model`, field by field as [`FIELDS`] says.
pub fn to_messages_request(body: &[u8], model: &str) -> Result<Vec<u8>, ApiError> {
    let request: Map<String, Value> =
        serde_json::from_slice(body).map_err(ApiError::invalid_json)?;
    refuse_unsupported(&request)?;
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
        let tools = tools
            .iter()
            .map(|tool| {
                if tool["type"] != "function" {
                    return Err(invalid("tools", "only function tools can be sent to this model (an Anthropic model)"));
                }
                let function = &tool["function"];
                if function["name"] == STRUCTURED_TOOL {
                    return Err(invalid("tools", &format!("the tool name '{STRUCTURED_TOOL}' is the gateway's")));
                }
                let mut out = json!({
                    "name": function["name"],
                    "input_schema": if function["parameters"].is_null() { json!({"type": "object"}) } else { function["parameters"].clone() },
                });
                if let Some(description) = function["description"].as_str() {
                    out["description"] = json!(description);
                }
                Ok(out)
            })
            .collect::<Result<Vec<Value>, ApiError>>()?;
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
    if request.get("parallel_tool_calls") == Some(&json!(false)) {
        let choice = out
            .entry("tool_choice")
            .or_insert_with(|| json!({"type": "auto"}));
        choice["disable_parallel_tool_use"] = json!(true);
    }
    structured_output(&request, &mut out)?;
    let user = request
        .get("user")
        .or_else(|| request.get("safety_identifier"))
        .and_then(Value::as_str);
    if let Some(user) = user {
        out.insert("metadata".into(), json!({"user_id": user}));
    }
    // Asked for the standard tier: Anthropic's `auto` would use its
    // Priority Tier where the organisation has it (and bill it so).
    if request.get("service_tier").and_then(Value::as_str) == Some("default") {
        out.insert("service_tier".into(), json!("standard_only"));
    }
    // What is not OpenAI's is Anthropic's own: passed on as it is.
    for (key, value) in &request {
        let known = FIELDS.iter().any(|(name, _)| name == key);
        if !known && !out.contains_key(key) {
            out.insert(key.clone(), value.clone());
        }
    }
    Ok(serde_json::to_vec(&Value::Object(out)).expect("a JSON value serialises"))
}

/// A JSON `response_format` as a forced tool whose input is the answer
/// (the translators turn it back into the message's content).
fn structured_output(
    request: &Map<String, Value>,
    out: &mut Map<String, Value>,
) -> Result<(), ApiError> {
    let format = match request.get("response_format") {
        None | Some(Value::Null) => return Ok(()),
        Some(format) => format,
    };
    let schema = match format["type"].as_str() {
        Some("text") => return Ok(()),
        Some("json_object") => json!({"type": "object"}),
        Some("json_schema") => {
            let schema = &format["json_schema"]["schema"];
            if schema["type"] != "object" {
                return Err(invalid(
                    "response_format",
                    "an Anthropic model answers a JSON schema only when its top level is an object",
                ));
            }
            schema.clone()
        }
        _ => {
            return Err(invalid(
                "response_format",
                "expected text, json_object or json_schema",
            ))
        }
    };
    if request.get("tools").is_some_and(|t| !t.is_null()) {
        return Err(invalid(
            "response_format",
            "a JSON response_format cannot be combined with tools for an Anthropic model",
        ));
    }
    out.insert(
        "tools".into(),
        json!([{"name": STRUCTURED_TOOL, "description": "Give the answer as JSON matching this schema.", "input_schema": schema}]),
    );
    out.insert(
        "tool_choice".into(),
        json!({"type": "tool", "name": STRUCTURED_TOOL}),
    );
    Ok(())
}

/// OpenAI message content (a string or parts) as Anthropic content blocks.
pub(super) fn content_blocks(content: &Value, index: usize) -> Result<Vec<Value>, ApiError> {
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

pub(super) fn image_block(url: &str) -> Value {
    if let Some(rest) = url.strip_prefix("data:") {
        if let Some((media, data)) = rest.split_once(";base64,") {
            return json!({"type": "image", "source": {"type": "base64", "media_type": media, "data": data}});
        }
    }
    json!({"type": "image", "source": {"type": "url", "url": url}})
}
