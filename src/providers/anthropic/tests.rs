//! Unit tests of the translation: requests, answers, errors and streams.

use super::*;
use crate::cost::Usage;
use serde_json::{json, Value};

fn translate(body: Value) -> Value {
    serde_json::from_slice(&to_messages_request(body.to_string().as_bytes(), "claude-x").unwrap())
        .unwrap()
}

#[test]
fn moves_system_messages_and_defaults_max_tokens() {
    let out = translate(json!({
        "model": "public",
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Hi"},
            {"role": "user", "content": [{"type": "text", "text": "again"}]},
        ],
        "temperature": 0.2, "top_p": 0.9, "stop": "END", "stream": true,
    }));
    assert_eq!(out["model"], "claude-x");
    assert_eq!(out["max_tokens"], DEFAULT_MAX_TOKENS);
    assert_eq!(
        out["system"],
        json!([{"type": "text", "text": "Be terse."}])
    );
    assert_eq!(
        out["messages"],
        json!([{"role": "user", "content": [
            {"type": "text", "text": "Hi"}, {"type": "text", "text": "again"}]}]),
        "same-role turns merge"
    );
    assert_eq!(
        (out["temperature"].clone(), out["top_p"].clone()),
        (json!(0.2), json!(0.9))
    );
    assert_eq!(out["stop_sequences"], json!(["END"]));
    assert_eq!(out["stream"], true);
}

#[test]
fn translates_tools_tool_calls_and_results() {
    let out = translate(json!({
        "model": "public", "max_completion_tokens": 50,
        "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Oslo\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
        ],
        "tools": [{"type": "function", "function": {"name": "weather", "description": "Get weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
        "tool_choice": {"type": "function", "function": {"name": "weather"}},
    }));
    assert_eq!(out["max_tokens"], 50);
    assert_eq!(
        out["messages"][1]["content"][0],
        json!({"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Oslo"}})
    );
    assert_eq!(
        out["messages"][2],
        json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "Sunny"}]})
    );
    assert_eq!(
        out["tools"][0]["input_schema"]["properties"]["city"]["type"],
        "string"
    );
    assert_eq!(out["tools"][0]["description"], "Get weather");
    assert_eq!(
        out["tool_choice"],
        json!({"type": "tool", "name": "weather"})
    );
}

#[test]
fn translates_images() {
    let out = translate(
        json!({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        ]}]}),
    );
    let content = &out["messages"][0]["content"];
    assert_eq!(
        content[0]["source"],
        json!({"type": "base64", "media_type": "image/png", "data": "AAAA"})
    );
    assert_eq!(
        content[1]["source"],
        json!({"type": "url", "url": "https://example.com/cat.png"})
    );
}

#[test]
fn rejects_messages_it_cannot_translate() {
    for body in [
        json!({"model": "m"}),
        json!({"model": "m", "messages": [{"role": "robot", "content": "x"}]}),
    ] {
        let err = to_messages_request(body.to_string().as_bytes(), "c").unwrap_err();
        assert_eq!(err.status, 400);
    }
}

#[test]
fn translates_a_json_answer_with_cache_usage() {
    let answer = json!({
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
        "content": [{"type": "text", "text": "Hello"}, {"type": "tool_use", "id": "tu_1", "name": "f", "input": {"a": 1}}],
        "stop_reason": "tool_use",
        "usage": {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 20, "cache_creation_input_tokens": 3},
    });
    let (body, usage) = to_chat_completion(answer.to_string().as_bytes(), "public").unwrap();
    let out: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(out["object"], "chat.completion");
    assert_eq!(out["model"], "public");
    assert_eq!(out["choices"][0]["message"]["content"], "Hello");
    assert_eq!(
        out["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
        "{\"a\":1}"
    );
    assert_eq!(out["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(
        usage,
        Usage {
            prompt_tokens: 33,
            completion_tokens: 5,
            cached_tokens: 20,
            estimated: false
        }
    );
    assert_eq!(out["usage"]["prompt_tokens_details"]["cached_tokens"], 20);
}

const STREAM: &str = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_9\",\"type\":\"message\",\"role\":\"assistant\",\"usage\":{\"input_tokens\":12,\"output_tokens\":1,\"cache_read_input_tokens\":4}}}\n\nevent: ping\ndata: {\"type\":\"ping\"}\n\nevent: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hel\"}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"lo\"}}\n\nevent: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\nevent: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"tool_use\",\"id\":\"tu_1\",\"name\":\"f\",\"input\":{}}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"a\\\":\"}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"1}\"}}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\"},\"usage\":{\"output_tokens\":7}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";

fn run(include_usage: bool, chunk: usize) -> (Vec<Value>, bool, StreamTranslator) {
    let mut translator = StreamTranslator::new("public", include_usage);
    let mut out = Vec::new();
    for piece in STREAM.as_bytes().chunks(chunk) {
        out.extend_from_slice(&translator.feed(piece));
    }
    let text = String::from_utf8(out).unwrap();
    let done = text.ends_with("data: [DONE]\n\n");
    let events = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    (events, done, translator)
}

#[test]
fn translates_a_stream_split_at_any_byte() {
    for chunk in [1, 7, 33, 4096] {
        let (events, done, translator) = run(false, chunk);
        assert!(done, "chunk {chunk}");
        assert_eq!(
            events[0]["choices"][0]["delta"],
            json!({"role": "assistant", "content": ""})
        );
        let text: String = events
            .iter()
            .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, "Hello");
        let tool: Vec<&Value> = events
            .iter()
            .filter_map(|e| e["choices"][0]["delta"]["tool_calls"].get(0))
            .collect();
        assert_eq!(tool[0]["id"], "tu_1");
        assert_eq!(tool[0]["function"]["name"], "f");
        let args: String = tool
            .iter()
            .filter_map(|t| t["function"]["arguments"].as_str())
            .collect();
        assert_eq!(args, "{\"a\":1}");
        assert_eq!(
            events.last().unwrap()["choices"][0]["finish_reason"],
            "tool_calls"
        );
        assert!(
            events.iter().all(|e| e.get("usage").is_none()),
            "no usage unless asked"
        );
        assert_eq!(
            translator.usage(),
            Some(Usage {
                prompt_tokens: 16,
                completion_tokens: 7,
                cached_tokens: 4,
                estimated: false
            })
        );
    }
}

#[test]
fn adds_the_usage_chunk_when_the_client_asked() {
    let (events, _, _) = run(true, 50);
    let last = events.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["prompt_tokens"], 16);
    assert_eq!(last["usage"]["completion_tokens"], 7);
    assert_eq!(last["usage"]["prompt_tokens_details"]["cached_tokens"], 4);
    assert!(events[..events.len() - 1]
        .iter()
        .all(|e| e["usage"].is_null()));
}

#[test]
fn drops_an_endless_line_and_goes_on() {
    let mut translator = StreamTranslator::new("p", false);
    for _ in 0..40 {
        assert!(translator.feed(&[b'x'; 64 * 1024]).is_empty());
        assert!(translator.partial.len() <= crate::cost::MAX_LINE_BYTES + 64 * 1024);
    }
    translator.feed(b"\n\n");
    let out = translator.feed(STREAM.as_bytes());
    assert!(String::from_utf8_lossy(&out).ends_with("data: [DONE]\n\n"));
}

#[test]
fn maps_errors_in_streams_and_answers() {
    let mut translator = StreamTranslator::new("p", false);
    let out = translator.feed(b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n");
    let text = String::from_utf8(out.to_vec()).unwrap();
    assert!(text.starts_with("data: {\"error\""), "{text}");
    assert!(!text.contains("[DONE]"));
    let err = to_openai_error(
        400,
        br#"{"type":"error","error":{"type":"invalid_request_error","message":"bad"}}"#,
    );
    assert_eq!((err.status, &*err.message), (400, "bad"));
    assert_eq!(
        to_openai_error(
            404,
            br#"{"type":"error","error":{"type":"not_found_error","message":"no model"}}"#
        )
        .status,
        404
    );
    assert_eq!(to_openai_error(429, b"{}").status, 429);
    assert_eq!(to_openai_error(529, b"not json").status, 502);
}

#[test]
fn recognises_anthropics_ways_of_saying_the_prompt_is_too_long() {
    for message in [
        "prompt is too long: 210000 tokens > 200000 maximum",
        "input length and `max_tokens` exceed context limit: 199759 + 8192 > 200000, decrease input length or `max_tokens` and try again",
    ] {
        let body = json!({"type": "error", "error": {"type": "invalid_request_error", "message": message}});
        let error = to_openai_error(400, body.to_string().as_bytes());
        assert_eq!(error.code, "context_length_exceeded", "{message}");
    }
    let other = json!({"type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: field required"}});
    assert_eq!(
        to_openai_error(400, other.to_string().as_bytes()).code,
        "invalid_request"
    );
}
