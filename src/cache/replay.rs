//! A cached answer is kept as the JSON answer (a `chat.completion`,
//! `text_completion` or embedding list), whichever form it came in, and
//! replayed in the form the client asks for: a streamed answer is
//! assembled into the JSON one ([`from_stream`]), and the JSON one is
//! rendered as a stream ([`render_stream`]). Every replay gets a fresh `id`
//! and `created`.

use crate::cost::Usage;
use crate::openai::Endpoint;
use bytes::Bytes;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// A JSON answer as a client got it: kept when it is the endpoint's
/// answer (a `chat.completion` or `text_completion` with choices, an
/// embedding list with data), not an error or anything else a provider
/// may answer 200 with.
pub fn from_json(body: &[u8], endpoint: Endpoint) -> Option<Map<String, Value>> {
    let Value::Object(answer) = serde_json::from_slice::<Value>(body).ok()? else {
        return None;
    };
    let (object, list) = match endpoint {
        Endpoint::ChatCompletions => ("chat.completion", "choices"),
        Endpoint::Completions => ("text_completion", "choices"),
        Endpoint::Embeddings => ("list", "data"),
        _ => return None,
    };
    let items = answer.get(list).and_then(Value::as_array);
    let shaped = answer.get("object").and_then(Value::as_str) == Some(object)
        && items.is_some_and(|items| !items.is_empty() && items.iter().all(Value::is_object))
        && !answer.contains_key("error");
    shaped.then_some(answer)
}

/// Fields of an answer a stream replay carries: anything else (log
/// probabilities, audio, annotations, a legacy `function_call`, a
/// provider's own fields) only JSON can, so an answer with them is never
/// replayed as a stream, and a stream with them is not stored.
const STREAMED_ANSWER_FIELDS: [&str; 8] = [
    "id",
    "object",
    "created",
    "model",
    "choices",
    "usage",
    "system_fingerprint",
    "service_tier",
];
const STREAMED_CHOICE_FIELDS: [&str; 5] = ["index", "message", "text", "logprobs", "finish_reason"];
const STREAMED_CHUNK_CHOICE_FIELDS: [&str; 5] =
    ["index", "delta", "text", "logprobs", "finish_reason"];
const STREAMED_MESSAGE_FIELDS: [&str; 4] = ["role", "content", "refusal", "tool_calls"];

/// Fields a stream's chunks may carry that say nothing about the answer
/// (OpenAI's padding against length side channels).
const IGNORED_CHUNK_FIELDS: [&str; 1] = ["obfuscation"];

/// Whether a JSON answer can be replayed as a stream exactly: only fields
/// a stream's chunks carry (or nulls, or empty annotations).
pub fn streamable(answer: &Map<String, Value>) -> bool {
    let empty = |v: &Value| v.is_null() || v.as_array().is_some_and(Vec::is_empty);
    let only = |map: &Map<String, Value>, known: &[&str]| {
        map.iter()
            .all(|(name, value)| known.contains(&name.as_str()) || value.is_null())
    };
    let message_ok = |message: &Value| {
        message.as_object().is_some_and(|m| {
            m.iter().all(|(name, value)| {
                STREAMED_MESSAGE_FIELDS.contains(&name.as_str())
                    || (name == "annotations" && empty(value))
                    || value.is_null()
            })
        })
    };
    let choice_ok = |choice: &Value| {
        choice.as_object().is_some_and(|c| {
            only(c, &STREAMED_CHOICE_FIELDS)
                && c.get("logprobs").is_none_or(empty)
                && c.get("message").is_none_or(message_ok)
        })
    };
    only(answer, &STREAMED_ANSWER_FIELDS)
        && answer
            .get("choices")
            .and_then(Value::as_array)
            .is_some_and(|choices| choices.iter().all(choice_ok))
}

/// One choice being assembled from stream chunks.
#[derive(Default)]
struct Choice {
    content: Option<String>,
    refusal: Option<String>,
    text: String,
    tool_calls: Vec<Map<String, Value>>,
    finish_reason: Option<Value>,
}

/// Appends a JSON string to `into` (created on first use); false when it
/// is not a string.
fn append(into: &mut Option<String>, value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::String(s) => {
            into.get_or_insert_with(String::new).push_str(s);
            true
        }
        _ => false,
    }
}

/// Merges a `tool_calls` delta (by each call's `index`) into `calls`.
fn merge_tool_calls(calls: &mut Vec<Map<String, Value>>, delta: &Value) -> Option<()> {
    for call in delta.as_array()? {
        let index = usize::try_from(call.get("index")?.as_u64()?).ok()?;
        if index > 128 {
            return None;
        }
        if calls.len() <= index {
            calls.resize_with(index + 1, Map::new);
        }
        let into = &mut calls[index];
        for (name, value) in call.as_object()? {
            match (name.as_str(), value) {
                ("index", _) | (_, Value::Null) => {}
                ("function", Value::Object(function)) => {
                    let into = into
                        .entry("function")
                        .or_insert_with(|| json!({}))
                        .as_object_mut()?;
                    for (part, piece) in function {
                        let mut text = into.get(part).and_then(Value::as_str).map(str::to_owned);
                        if !append(&mut text, piece) {
                            return None;
                        }
                        into.insert(part.clone(), Value::String(text.unwrap_or_default()));
                    }
                }
                ("id" | "type", Value::String(_)) => {
                    into.insert(name.clone(), value.clone());
                }
                _ => return None,
            }
        }
    }
    Some(())
}

/// The JSON answer a completed chat or text completion stream (the SSE
/// bytes a client got) adds up to; `usage` when the stream carried none
/// (the client did not ask for it; `None` when that usage is only the
/// gateway's estimate). `None` for anything it cannot reproduce exactly:
/// an error event, an unfinished choice, no `[DONE]`, log probabilities,
/// or fields it does not know.
pub fn from_stream(
    sse: &[u8],
    endpoint: Endpoint,
    usage: Option<Usage>,
) -> Option<Map<String, Value>> {
    let chat = match endpoint {
        Endpoint::ChatCompletions => true,
        Endpoint::Completions => false,
        _ => return None,
    };
    let text = std::str::from_utf8(sse).ok()?.replace("\r\n", "\n");
    let mut identity: Option<Map<String, Value>> = None;
    let mut reported_usage = None;
    let mut choices: Vec<Choice> = Vec::new();
    let mut done = false;
    for event in text.split("\n\n").map(str::trim).filter(|e| !e.is_empty()) {
        let mut payload = String::new();
        for line in event.lines() {
            if let Some(data) = line.strip_prefix("data:") {
                if !payload.is_empty() {
                    payload.push('\n');
                }
                payload.push_str(data.trim_start());
            }
        }
        if payload.is_empty() {
            continue;
        }
        if done {
            return None;
        }
        if payload == "[DONE]" {
            done = true;
            continue;
        }
        let Value::Object(chunk) = serde_json::from_str::<Value>(&payload).ok()? else {
            return None;
        };
        let known = |name: &str| {
            STREAMED_ANSWER_FIELDS.contains(&name) || IGNORED_CHUNK_FIELDS.contains(&name)
        };
        if chunk.keys().any(|name| !known(name)) {
            return None;
        }
        // The first chunk that names the answer (Azure opens with one of
        // prompt filter results, with an empty id and model).
        let names_it = chunk
            .get("id")
            .and_then(Value::as_str)
            .is_some_and(|id| !id.is_empty());
        if identity.is_none() && names_it {
            let mut first = Map::new();
            for name in [
                "id",
                "created",
                "model",
                "system_fingerprint",
                "service_tier",
            ] {
                if let Some(value) = chunk.get(name).filter(|v| !v.is_null()) {
                    first.insert(name.to_string(), value.clone());
                }
            }
            identity = Some(first);
        }
        if let Some(usage) = chunk.get("usage").filter(|u| !u.is_null()) {
            reported_usage = Some(usage.clone());
        }
        for choice in chunk
            .get("choices")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let index = usize::try_from(choice.get("index")?.as_u64()?).ok()?;
            if index > 128 {
                return None;
            }
            if choices.len() <= index {
                choices.resize_with(index + 1, Choice::default);
            }
            let into = &mut choices[index];
            let unknown = choice.as_object()?.iter().any(|(name, value)| {
                !STREAMED_CHUNK_CHOICE_FIELDS.contains(&name.as_str()) && !value.is_null()
            });
            if unknown || choice.get("logprobs").is_some_and(|l| !l.is_null()) {
                return None;
            }
            if let Some(reason) = choice.get("finish_reason").filter(|r| !r.is_null()) {
                into.finish_reason = Some(reason.clone());
            }
            if !chat {
                let mut text = Some(std::mem::take(&mut into.text));
                if !append(&mut text, choice.get("text").unwrap_or(&Value::Null)) {
                    return None;
                }
                into.text = text.unwrap_or_default();
                continue;
            }
            let Some(delta) = choice.get("delta") else {
                continue;
            };
            for (name, value) in delta.as_object()? {
                let known = match name.as_str() {
                    "role" => value.is_null() || value == "assistant",
                    "content" => append(&mut into.content, value),
                    "refusal" => append(&mut into.refusal, value),
                    "tool_calls" => {
                        value.is_null() || merge_tool_calls(&mut into.tool_calls, value).is_some()
                    }
                    _ => value.is_null(),
                };
                if !known {
                    return None;
                }
            }
        }
    }
    if !done || choices.is_empty() || choices.iter().any(|c| c.finish_reason.is_none()) {
        return None;
    }
    let mut answer = identity.unwrap_or_default();
    answer.insert(
        "object".into(),
        Value::from(if chat {
            "chat.completion"
        } else {
            "text_completion"
        }),
    );
    let choices: Vec<Value> = choices
        .into_iter()
        .enumerate()
        .map(|(index, c)| {
            if !chat {
                return json!({"text": c.text, "index": index, "logprobs": null, "finish_reason": c.finish_reason});
            }
            let mut message = json!({"role": "assistant", "content": c.content, "refusal": c.refusal});
            if !c.tool_calls.is_empty() {
                message["tool_calls"] = Value::Array(c.tool_calls.into_iter().map(Value::Object).collect());
            }
            json!({"index": index, "message": message, "logprobs": null, "finish_reason": c.finish_reason})
        })
        .collect();
    answer.insert("choices".into(), Value::Array(choices));
    let usage = match reported_usage {
        Some(reported) => reported,
        None => {
            let usage = usage?;
            json!({
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            })
        }
    };
    answer.insert("usage".into(), usage);
    Some(answer)
}

/// A fresh id of the kind of `id` (its prefix up to the first `-`).
fn fresh_id(id: &str) -> String {
    let prefix = match id.split_once('-') {
        Some((prefix, _)) if prefix.len() <= 16 => format!("{prefix}-"),
        _ => "cached-".to_string(),
    };
    crate::ids::random_id(&prefix)
}

/// A fresh `id` of the answer's kind, and `created` now.
fn refreshed(answer: &Map<String, Value>, now_secs: u64) -> Map<String, Value> {
    let mut answer = answer.clone();
    if let Some(Value::String(id)) = answer.get("id") {
        answer.insert("id".into(), Value::String(fresh_id(id)));
    }
    if answer.contains_key("created") {
        answer.insert("created".into(), Value::from(now_secs));
    }
    answer
}

/// The stored answer (a JSON object, as [`crate::cache::Entry`] keeps it)
/// as a JSON body with a fresh `id` and `created`: the same bytes as the
/// answer parsed and written again, but only its top level is read and
/// every other member is copied as stored. `None` when it is not an
/// object.
pub fn render_json(answer: &RawValue, now_secs: u64) -> Option<Bytes> {
    // Sorted and deduplicated as `Map` would be.
    let members: BTreeMap<String, &RawValue> = serde_json::from_str(answer.get()).ok()?;
    let mut out = Vec::with_capacity(answer.get().len() + 16);
    out.push(b'{');
    for (i, (name, value)) in members.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut out, name).ok()?;
        out.push(b':');
        let id = (name == "id")
            .then(|| serde_json::from_str::<String>(value.get()).ok())
            .flatten();
        match (name.as_str(), id) {
            (_, Some(id)) => serde_json::to_writer(&mut out, &fresh_id(&id)).ok()?,
            ("created", None) => {
                out.extend_from_slice(itoa::Buffer::new().format(now_secs).as_bytes())
            }
            _ => out.extend_from_slice(value.get().as_bytes()),
        }
    }
    out.push(b'}');
    Some(Bytes::from(out))
}

/// The stored answer as an SSE stream: a chunk per choice with its whole
/// content, one with its finish reason, the usage chunk when asked for,
/// then `[DONE]`. `None` for an answer that is not a chat or text
/// completion.
pub fn render_stream(
    answer: &Map<String, Value>,
    include_usage: bool,
    now_secs: u64,
) -> Option<Bytes> {
    let answer = refreshed(answer, now_secs);
    let chat = match answer.get("object").and_then(Value::as_str) {
        Some("chat.completion") => true,
        Some("text_completion") => false,
        _ => return None,
    };
    let mut head = Map::new();
    for name in [
        "id",
        "object",
        "created",
        "model",
        "system_fingerprint",
        "service_tier",
    ] {
        if let Some(value) = answer.get(name) {
            head.insert(name.to_string(), value.clone());
        }
    }
    if chat {
        head.insert("object".into(), Value::from("chat.completion.chunk"));
    }
    if include_usage {
        head.insert("usage".into(), Value::Null);
    }
    let mut out = Vec::new();
    let mut event = |choices: Value, usage: Option<&Value>| {
        let mut chunk = head.clone();
        chunk.insert("choices".into(), choices);
        if let Some(usage) = usage {
            chunk.insert("usage".into(), usage.clone());
        }
        out.extend_from_slice(b"data: ");
        serde_json::to_writer(&mut out, &chunk).expect("JSON serialises");
        out.extend_from_slice(b"\n\n");
    };
    for choice in answer.get("choices").and_then(Value::as_array)? {
        let index = choice.get("index").cloned().unwrap_or(Value::from(0));
        let finish = choice.get("finish_reason").cloned().unwrap_or(Value::Null);
        if chat {
            let message = choice.get("message")?;
            let mut delta = json!({"role": "assistant", "content": message.get("content").cloned().unwrap_or(Value::Null)});
            if let Some(refusal) = message.get("refusal").filter(|r| !r.is_null()) {
                delta["refusal"] = refusal.clone();
            }
            if let Some(Value::Array(calls)) = message.get("tool_calls") {
                let calls: Vec<Value> = calls
                    .iter()
                    .enumerate()
                    .map(|(i, call)| {
                        let mut call = call.clone();
                        call["index"] = Value::from(i);
                        call
                    })
                    .collect();
                delta["tool_calls"] = Value::Array(calls);
            }
            event(
                json!([{"index": index, "delta": delta, "logprobs": null, "finish_reason": null}]),
                None,
            );
            event(
                json!([{"index": index, "delta": {}, "logprobs": null, "finish_reason": finish}]),
                None,
            );
        } else {
            let text = choice.get("text").cloned().unwrap_or(Value::from(""));
            event(
                json!([{"text": text, "index": index, "logprobs": null, "finish_reason": null}]),
                None,
            );
            event(
                json!([{"text": "", "index": index, "logprobs": null, "finish_reason": finish}]),
                None,
            );
        }
    }
    if include_usage {
        event(json!([]), Some(answer.get("usage").unwrap_or(&Value::Null)));
    }
    out.extend_from_slice(b"data: [DONE]\n\n");
    Some(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = concat!(
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":5,\"model\":\"m-1\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":5,\"model\":\"m-1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":5,\"model\":\"m-1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":5,\"model\":\"m-1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
        "data: [DONE]\n\n",
    );

    fn usage() -> Usage {
        Usage {
            prompt_tokens: 7,
            completion_tokens: 2,
            ..Default::default()
        }
    }

    #[test]
    fn a_stream_assembles_into_its_json_answer_and_back() {
        let answer =
            from_stream(STREAM.as_bytes(), Endpoint::ChatCompletions, Some(usage())).unwrap();
        assert_eq!(answer["object"], "chat.completion");
        assert_eq!(answer["model"], "m-1");
        assert_eq!(answer["choices"][0]["message"]["content"], "Hello");
        assert_eq!(answer["choices"][0]["finish_reason"], "stop");
        assert_eq!(answer["usage"]["total_tokens"], 9);
        let replay = render_stream(&answer, true, 99).unwrap();
        let again = from_stream(&replay, Endpoint::ChatCompletions, None).unwrap();
        assert_eq!(again["choices"], answer["choices"]);
        assert_eq!(again["usage"], answer["usage"]);
        assert_eq!(again["created"], 99);
        assert_ne!(again["id"], answer["id"], "a fresh id");
        assert!(again["id"].as_str().unwrap().starts_with("chatcmpl-"));
        let raw = serde_json::value::to_raw_value(&answer).unwrap();
        let json: Value = serde_json::from_slice(&render_json(&raw, 99).unwrap()).unwrap();
        assert_eq!(json["choices"], answer["choices"]);
        assert_ne!(json["id"], answer["id"]);
    }

    #[test]
    fn crlf_framing_padding_and_an_azure_opening_chunk_assemble() {
        let opening =
            "data: {\"id\":\"\",\"object\":\"\",\"created\":0,\"model\":\"\",\"choices\":[]}\n\n";
        let padded = STREAM.replace("\"created\":5,", "\"created\":5,\"obfuscation\":\"abc\",");
        let azure = format!("{opening}{padded}").replace('\n', "\r\n");
        let answer =
            from_stream(azure.as_bytes(), Endpoint::ChatCompletions, Some(usage())).unwrap();
        assert_eq!(answer["model"], "m-1");
        assert_eq!(answer["id"], "chatcmpl-1");
        assert_eq!(answer["choices"][0]["message"]["content"], "Hello");
    }

    #[test]
    fn json_answers_with_fields_a_stream_cannot_carry_are_not_streamed() {
        let plain = r#"{"id":"c","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"x","refusal":null,"annotations":[]},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;
        let parse = |text: &str| from_json(text.as_bytes(), Endpoint::ChatCompletions).unwrap();
        assert!(streamable(&parse(plain)));
        for (from, to) in [
            (
                "\"logprobs\":null",
                "\"logprobs\":{\"content\":[{\"token\":\"x\"}]}",
            ),
            (
                "\"refusal\":null",
                "\"function_call\":{\"name\":\"f\",\"arguments\":\"{}\"}",
            ),
            (
                "\"annotations\":[]",
                "\"annotations\":[{\"type\":\"url_citation\"}]",
            ),
            ("\"created\":1", "\"created\":1,\"citations\":[\"u\"]"),
            ("\"refusal\":null", "\"audio\":{\"id\":\"a\"}"),
        ] {
            assert!(!streamable(&parse(&plain.replace(from, to))), "{to}");
        }
    }

    #[test]
    fn tool_calls_merge_by_index() {
        let stream = concat!(
            "data: {\"id\":\"c\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"tool_calls\":[{\"index\":0,\"id\":\"call_1\",\"type\":\"function\",\"function\":{\"name\":\"f\",\"arguments\":\"\"}}]},\"finish_reason\":null}]}\n\n",
            "data: {\"id\":\"c\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"a\\\":\"}}]},\"finish_reason\":null}]}\n\n",
            "data: {\"id\":\"c\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"1}\"}}]},\"finish_reason\":\"tool_calls\"}]}\n\n",
            "data: [DONE]\n\n",
        );
        let answer =
            from_stream(stream.as_bytes(), Endpoint::ChatCompletions, Some(usage())).unwrap();
        let call = &answer["choices"][0]["message"]["tool_calls"][0];
        assert_eq!(call["id"], "call_1");
        assert_eq!(call["function"]["name"], "f");
        assert_eq!(call["function"]["arguments"], "{\"a\":1}");
        assert_eq!(answer["choices"][0]["message"]["content"], Value::Null);
    }

    #[test]
    fn incomplete_or_unknown_streams_are_not_stored() {
        let without_done = STREAM.replace("data: [DONE]\n\n", "");
        assert!(from_stream(
            without_done.as_bytes(),
            Endpoint::ChatCompletions,
            Some(usage())
        )
        .is_none());
        let unfinished = STREAM.replace("\"finish_reason\":\"stop\"", "\"finish_reason\":null");
        assert!(from_stream(
            unfinished.as_bytes(),
            Endpoint::ChatCompletions,
            Some(usage())
        )
        .is_none());
        let error = format!(
            "{}data: {{\"error\":{{\"message\":\"x\"}}}}\n\n",
            STREAM.replace("data: [DONE]\n\n", "")
        );
        assert!(from_stream(error.as_bytes(), Endpoint::ChatCompletions, Some(usage())).is_none());
        let audio = STREAM.replace("{\"content\":\"lo\"}", "{\"audio\":{\"data\":\"x\"}}");
        assert!(from_stream(audio.as_bytes(), Endpoint::ChatCompletions, Some(usage())).is_none());
        let logprobs = STREAM.replace(
            "\"delta\":{\"content\":\"lo\"},",
            "\"delta\":{\"content\":\"lo\"},\"logprobs\":{\"content\":[]},",
        );
        assert!(from_stream(
            logprobs.as_bytes(),
            Endpoint::ChatCompletions,
            Some(usage())
        )
        .is_none());
        assert!(from_json(br#"{"error":{"message":"x"}}"#, Endpoint::ChatCompletions).is_none());
        for not_an_answer in [
            &br#"{"object":"error","message":"The server is overloaded"}"#[..],
            br#"{}"#,
            br#"{"detail":"x"}"#,
            br#"{"object":"chat.completion","choices":[]}"#,
            br#"[1]"#,
        ] {
            assert!(from_json(not_an_answer, Endpoint::ChatCompletions).is_none());
        }
        // An estimated usage is not passed off as the provider's.
        assert!(from_stream(STREAM.as_bytes(), Endpoint::ChatCompletions, None).is_none());
        // Chunk fields it does not know: not stored.
        let extra = STREAM.replace("\"created\":5,", "\"created\":5,\"citations\":[\"u\"],");
        assert!(from_stream(extra.as_bytes(), Endpoint::ChatCompletions, Some(usage())).is_none());
        let filtered = STREAM.replace(
            "\"finish_reason\":\"stop\"}",
            "\"finish_reason\":\"stop\",\"content_filter_results\":{\"hate\":{}}}",
        );
        assert!(from_stream(
            filtered.as_bytes(),
            Endpoint::ChatCompletions,
            Some(usage())
        )
        .is_none());
    }

    #[test]
    fn a_text_completion_streams_and_assembles() {
        let answer = from_json(br#"{"id":"cmpl-9","object":"text_completion","created":1,"model":"m","choices":[{"text":"abc","index":0,"logprobs":null,"finish_reason":"length"}],"usage":{"prompt_tokens":1,"completion_tokens":3,"total_tokens":4}}"#, Endpoint::Completions).unwrap();
        assert!(streamable(&answer));
        let stream = render_stream(&answer, false, 7).unwrap();
        assert!(!String::from_utf8_lossy(&stream).contains("usage"));
        let again = from_stream(&stream, Endpoint::Completions, Some(usage())).unwrap();
        assert_eq!(again["choices"][0]["text"], "abc");
        assert_eq!(again["choices"][0]["finish_reason"], "length");
        assert!(again["id"].as_str().unwrap().starts_with("cmpl-"));
    }

    /// The bytes rendering the tree gives (`refreshed`, written again),
    /// with the id `render_json` chose, for `stored` as an entry keeps it.
    fn rendered_from_the_tree(stored: &Map<String, Value>, fresh: &Map<String, Value>) -> Vec<u8> {
        let mut expected = refreshed(stored, 99);
        if let Some(id) = fresh
            .get("id")
            .filter(|_| stored.get("id").is_some_and(Value::is_string))
        {
            expected.insert("id".into(), id.clone());
        }
        serde_json::to_vec(&expected).unwrap()
    }

    #[test]
    fn a_json_replay_reads_only_the_top_level_and_writes_what_the_tree_would() {
        for stored in [
            r#"{"id":"chatcmpl-abc","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"caf\u00e9 \"q\" \n"}}],"usage":{"prompt_tokens":1}}"#,
            r#"{"id":7,"created":"x","z\"k":1.5e300,"\u00e9":[],"a":-0.0}"#,
            r#"{"id":"no_dash_here","data":[{"embedding":[0.1,-2e-5]}]}"#,
            r#"{}"#,
        ] {
            let map: Map<String, Value> = serde_json::from_str(stored).unwrap();
            // An entry keeps the answer as the tree wrote it.
            let raw = serde_json::value::to_raw_value(&map).unwrap();
            let out = render_json(&raw, 99).unwrap();
            let fresh: Map<String, Value> = serde_json::from_slice(&out).unwrap();
            assert_eq!(out, rendered_from_the_tree(&map, &fresh), "{stored}");
            if let Some(Value::String(id)) = map.get("id") {
                assert_ne!(fresh["id"], map["id"], "a fresh id");
                let kind = id
                    .split_once('-')
                    .map_or("cached-", |(p, _)| &id[..=p.len()]);
                assert!(fresh["id"].as_str().unwrap().starts_with(kind), "{stored}");
            }
        }
        for not_an_object in ["[1]", "\"s\"", "3", "null"] {
            let raw = RawValue::from_string(not_an_object.into()).unwrap();
            assert!(render_json(&raw, 99).is_none(), "{not_an_object}");
        }
    }

    proptest::proptest! {
        /// Any stored object replays as the same bytes the tree gives.
        #[test]
        fn any_stored_answer_replays_as_the_tree_would(map in arbitrary_answer()) {
            let raw = serde_json::value::to_raw_value(&map).unwrap();
            let out = render_json(&raw, 99).unwrap();
            let fresh: Map<String, Value> = serde_json::from_slice(&out).unwrap();
            proptest::prop_assert_eq!(out, rendered_from_the_tree(&map, &fresh));
        }
    }

    /// A JSON object with the members a replay changes (`id`, `created`)
    /// of any type or absent, and others nested, escaped and numeric.
    fn arbitrary_answer() -> impl proptest::strategy::Strategy<Value = Map<String, Value>> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            ".{0,8}".prop_map(Value::from),
        ];
        let value = leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..3).prop_map(Value::from),
                prop::collection::btree_map(".{0,4}", inner, 0..3)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        });
        let name = prop_oneof![
            Just("id".to_string()),
            Just("created".to_string()),
            Just("choices".to_string()),
            ".{0,6}",
        ];
        let id = prop_oneof![
            Just(None),
            "[a-z]{0,20}(-[a-z0-9]{0,8})?".prop_map(|s| Some(Value::from(s))),
        ];
        (prop::collection::vec((name, value), 0..6), id).prop_map(|(members, id)| {
            let mut map: Map<String, Value> = members.into_iter().collect();
            if let Some(id) = id {
                map.insert("id".into(), id);
            }
            map
        })
    }
}
