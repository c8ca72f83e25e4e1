//! An OpenAI chat completions request as a Messages API request.

use super::{invalid, DEFAULT_MAX_TOKENS};
use crate::openai::ApiError;
use serde_json::{json, Map, Value};

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
