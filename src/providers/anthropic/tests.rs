//! Unit tests of the translation: requests, answers, errors and streams.

use super::*;
use crate::cost::Usage;
use serde_json::{json, Value};

/// A JSON answer translated as the gateway does, counting (should the
/// provider report no usage) by a one-message prompt's estimate.
fn answer_of(answer: &Value) -> (Vec<u8>, Usage) {
    to_chat_completion(
        answer.to_string().as_bytes(),
        "public",
        &prompt_estimate(),
        "claude-x",
    )
    .unwrap()
}

/// The estimate of the prompt the counting tests' answers answer.
fn prompt_estimate() -> crate::cost::Estimate {
    let body = json!({"model": "claude-x", "stream": true,
        "messages": [{"role": "user", "content": "Write a few words about the sea"}]});
    crate::cost::Estimate::new(body.to_string().into(), None)
}

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
    let (body, usage) = answer_of(&answer);
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
            estimated: false,
            ..Default::default()
        }
    );
    assert_eq!(out["usage"]["prompt_tokens_details"]["cached_tokens"], 20);
}

#[test]
fn an_error_under_a_200_is_no_answer() {
    let refused = |answer: Value| {
        to_chat_completion(
            answer.to_string().as_bytes(),
            "public",
            &prompt_estimate(),
            "claude-x",
        )
        .unwrap_err()
    };
    let error = refused(json!({"type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"}}));
    assert_eq!((error.status, &*error.message), (502, "Overloaded"));
    let odd = refused(json!({"type": "completion", "completion": "hi"}));
    assert_eq!(odd.status, 502, "{}", odd.message);
    // Nothing at all is no answer either; an empty content is one.
    for nothing in [
        json!(null),
        json!({}),
        json!({"type": "message", "id": "msg_1"}),
    ] {
        let error = refused(nothing);
        assert_eq!(error.status, 502, "{}", error.message);
    }
    let empty = json!({"type": "message", "id": "msg_1", "content": [], "stop_reason": "end_turn",
                       "usage": {"input_tokens": 3, "output_tokens": 0}});
    assert!(to_chat_completion(
        empty.to_string().as_bytes(),
        "public",
        &prompt_estimate(),
        "claude-x"
    )
    .is_ok());
}

#[test]
fn an_answer_without_usage_to_bill_by_is_counted_and_says_so() {
    let estimate = prompt_estimate();
    let prompt_count = estimate.prompt_tokens("claude-x");
    let encoding = crate::cost::Encoding::for_model("claude-x");
    let answer = |content: Value, usage: Value| {
        let (body, billed) = answer_of(&json!({
            "id": "msg_1", "type": "message", "role": "assistant",
            "content": content, "stop_reason": "end_turn", "usage": usage,
        }));
        let out: Value = serde_json::from_slice(&body).unwrap();
        // The client's usage is the bill's.
        assert_eq!(out["usage"]["prompt_tokens"], billed.prompt_tokens);
        assert_eq!(out["usage"]["completion_tokens"], billed.completion_tokens);
        assert_eq!(out["usage"]["total_tokens"], billed.total());
        billed
    };
    let hello = json!([{"type": "text", "text": "Hello"}]);
    let hello_count = encoding.count("Hello");
    for usage in [
        Value::Null,
        json!({}),
        json!({"service_tier": "standard"}),
        json!({"input_tokens": 1e15, "output_tokens": 5}),
        json!({"input_tokens": 10, "output_tokens": -5}),
        json!({"input_tokens": 10, "output_tokens": 2.5}),
        json!({"input_tokens": 10, "output_tokens": "5"}),
        json!({"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": -1}),
        json!({"input_tokens": 99_999_999, "output_tokens": 5,
            "cache_read_input_tokens": 99_999_999, "cache_creation_input_tokens": 99_999_999}),
        json!({"output_tokens": 5}),
        json!({"input_tokens": null, "output_tokens": null}),
    ] {
        let billed = answer(hello.clone(), usage.clone());
        assert_eq!(
            (
                billed.prompt_tokens,
                billed.completion_tokens,
                billed.estimated
            ),
            (prompt_count, hello_count, true),
            "none of {usage} is taken"
        );
    }
    // The prompt's counts without the completion's: the prompt as
    // reported, the completion counted.
    for usage in [
        json!({"input_tokens": 10}),
        json!({"input_tokens": 10, "output_tokens": null, "cache_read_input_tokens": 4}),
    ] {
        let billed = answer(hello.clone(), usage.clone());
        let cached = usage["cache_read_input_tokens"].as_u64().unwrap_or(0);
        assert_eq!(
            (
                billed.prompt_tokens,
                billed.cached_tokens,
                billed.completion_tokens
            ),
            (10 + cached, cached, hello_count),
            "{usage}"
        );
    }
    // Thinking is billed as output, though the answer has no place for it;
    // a redacted block's data is not text the model wrote out.
    let thinking = json!([
        {"type": "thinking", "thinking": "Let me think about the sea", "signature": "c2lnbmF0dXJl"},
        {"type": "redacted_thinking", "data": "ZW5jcnlwdGVkIHJlYXNvbmluZw=="},
        {"type": "text", "text": "Hello"},
    ]);
    let billed = answer(thinking, Value::Null);
    assert_eq!(
        billed.completion_tokens,
        encoding.count("Let me think about the seaHello")
    );
    let kept = answer(
        json!([{"type": "text", "text": "Hello"}]),
        json!({"input_tokens": 10, "output_tokens": 5,
            "cache_read_input_tokens": null, "server_tool_use": {"web_search_requests": 1}}),
    );
    assert_eq!(
        (kept.prompt_tokens, kept.completion_tokens, kept.estimated),
        (10, 5, false)
    );
}

const STREAM: &str = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_9\",\"type\":\"message\",\"role\":\"assistant\",\"usage\":{\"input_tokens\":12,\"output_tokens\":1,\"cache_read_input_tokens\":4}}}\n\nevent: ping\ndata: {\"type\":\"ping\"}\n\nevent: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hel\"}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"lo\"}}\n\nevent: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\nevent: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"tool_use\",\"id\":\"tu_1\",\"name\":\"f\",\"input\":{}}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"a\\\":\"}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"1}\"}}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\"},\"usage\":{\"output_tokens\":7}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";

fn run(include_usage: bool, chunk: usize) -> (Vec<Value>, bool, StreamTranslator) {
    run_stream(STREAM, include_usage, chunk)
}

fn run_stream(
    stream: &str,
    include_usage: bool,
    chunk: usize,
) -> (Vec<Value>, bool, StreamTranslator) {
    let mut translator = StreamTranslator::new("public", include_usage);
    let mut out = Vec::new();
    for piece in stream.as_bytes().chunks(chunk) {
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
            json!({"role": "assistant", "content": null}),
            "content stays null until some comes"
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
                estimated: false,
                ..Default::default()
            })
        );
    }
}

#[test]
fn lines_may_end_with_a_carriage_return_as_sse_allows() {
    let (lf, _, lf_translator) = run(true, 4096);
    for line_end in ["\r\n", "\r"] {
        let stream = STREAM.replace('\n', line_end);
        for chunk in [1, 2, 7, 4096] {
            let (events, done, translator) = run_stream(&stream, true, chunk);
            // Each chunk names the time it was made: the rest is the same.
            let without_created = |events: &[Value]| {
                let mut events = events.to_vec();
                events.iter_mut().for_each(|e| e["created"] = Value::Null);
                events
            };
            assert_eq!(
                without_created(&events),
                without_created(&lf),
                "{line_end:?} in reads of {chunk}"
            );
            assert!(done);
            assert_eq!(translator.usage(), lf_translator.usage());
        }
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
fn an_event_too_long_to_hold_cuts_the_stream_and_is_counted() {
    let start = STREAM.split("event: ping").next().unwrap();
    let huge = "x".repeat(64 * 1024);
    for payload in [
        // One line that never ends, and one payload split over many lines.
        format!("event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"{huge}"),
        format!("event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\n{}", format!("data: \"{huge}\"\n").repeat(4)),
    ] {
        let mut translator = StreamTranslator::new("p", false);
        let mut out = String::from_utf8(translator.feed(start.as_bytes()).to_vec()).unwrap();
        for _ in 0..40 {
            out.push_str(&String::from_utf8_lossy(&translator.feed(payload.as_bytes())));
            assert!(translator.partial.len() <= crate::cost::MAX_LINE_BYTES + payload.len());
        }
        // Cut there, as a provider's break (the gateway fails over, resumes
        // or ends the stream with an error: no silent gap); nothing after
        // is translated.
        assert!(!out.contains("x".repeat(100).as_str()), "{out}");
        assert!(translator.cut() && !translator.finished());
        assert!(translator.feed(STREAM.as_bytes()).is_empty());
        // The bytes it held are billed as generated.
        let billed = translator.billed_usage();
        assert!(
            billed.completion_tokens as usize >= crate::cost::MAX_LINE_BYTES / 4,
            "{billed:?}"
        );
    }
}

#[test]
fn an_event_over_the_bound_is_cut_even_when_it_comes_whole() {
    let start = STREAM.split("event: ping").next().unwrap();
    let huge = format!(
        "event: content_block_delta\ndata: {}\n\n",
        json!({"type": "content_block_delta", "index": 0,
               "delta": {"type": "text_delta", "text": "x".repeat(crate::cost::MAX_LINE_BYTES)}})
    );
    let mut translator = StreamTranslator::new("p", false);
    let out = translator.feed(format!("{start}{huge}{STREAM}").as_bytes());
    assert!(!String::from_utf8_lossy(&out).contains("xxxx"));
    assert!(translator.cut() && !translator.finished());
    assert!(
        translator.billed_usage().completion_tokens as usize >= crate::cost::MAX_LINE_BYTES / 4
    );
}

#[test]
fn a_line_at_the_bound_is_judged_by_its_bytes_not_its_line_end() {
    // A data line of exactly the bound, ended by `\r\n`: whole in one
    // read, or split between its `\r` and `\n`.
    let start = STREAM.split("event: ping").next().unwrap();
    let line = |text: String| {
        let data = json!({"type": "content_block_delta", "index": 0,
                          "delta": {"type": "text_delta", "text": text}});
        format!("data: {data}")
    };
    let pad = crate::cost::MAX_LINE_BYTES - line(String::new()).len();
    let huge = format!(
        "event: content_block_delta\r\n{}\r\n\r\n",
        line("x".repeat(pad))
    );
    let text = format!("{start}{huge}{STREAM}");
    let at_cr = text.find("\r\n\r\n").unwrap() + 1;
    let mut outcomes = Vec::new();
    for pieces in [vec![&text[..]], vec![&text[..at_cr], &text[at_cr..]]] {
        let mut translator = StreamTranslator::new("p", false);
        let mut out = Vec::new();
        for piece in pieces {
            out.extend_from_slice(&translator.feed(piece.as_bytes()));
        }
        outcomes.push((translator.cut(), out.len(), translator.billed_usage()));
    }
    assert!(!outcomes[0].0, "not over the bound: translated");
    assert_eq!(outcomes[0], outcomes[1]);
}

#[test]
fn an_event_over_the_bound_after_the_final_delta_ends_the_whole_answer() {
    let (head, _) = STREAM.split_once("event: message_stop").unwrap();
    let huge = format!(
        "event: ping\ndata: {{\"pad\":\"{}",
        "x".repeat(crate::cost::MAX_LINE_BYTES)
    );
    for stream in [format!("{head}{huge}\"}}\n\n"), format!("{head}{huge}")] {
        let mut translator = StreamTranslator::new("public", true);
        let out = String::from_utf8(translator.feed(stream.as_bytes()).to_vec()).unwrap();
        assert!(translator.stopped() && !translator.cut(), "{}", &out[..200]);
        assert!(out.ends_with("data: [DONE]\n\n"));
        assert_eq!(
            translator.billed_usage().completion_tokens,
            7,
            "the provider's report"
        );
    }
}

#[test]
fn a_payload_split_over_data_lines_is_read_joined() {
    let mut split = String::new();
    for event in STREAM.split("\n\n").filter(|e| !e.is_empty()) {
        // Each JSON payload over several `data:` lines, as SSE allows.
        let (head, data) = event.split_once("data: ").unwrap();
        let lines: Vec<String> = data
            .replace(",\"", ",\n\"")
            .lines()
            .map(|l| format!("data: {l}\n"))
            .collect();
        assert!(lines.len() > 1 || !data.contains(','), "{event}");
        split.push_str(&format!("{head}{}\n", lines.concat()));
    }
    for chunk in [1, 13, 4096] {
        let mut translator = StreamTranslator::new("public", false);
        let mut out = Vec::new();
        for piece in split.as_bytes().chunks(chunk) {
            out.extend_from_slice(&translator.feed(piece));
        }
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("\"Hel\"") && text.contains("\"lo\""),
            "{text}"
        );
        assert!(text.ends_with("data: [DONE]\n\n"));
        assert_eq!(
            translator
                .usage()
                .map(|u| (u.prompt_tokens, u.completion_tokens)),
            Some((16, 7))
        );
        assert_eq!(translator.malformed(), 0);
    }
    // A line that is not JSON, with no blank line to end its event, does
    // not take the next event down with it (nor, with no blank lines at
    // all, the whole answer); it is counted as dropped.
    let no_blank_lines = STREAM.replace("\n\n", "\n");
    for stream in [
        STREAM.replacen("event: ping\n", "data: {not json at all\nevent: ping\n", 1),
        format!("data: {{not json\n{no_blank_lines}"),
    ] {
        let mut translator = StreamTranslator::new("public", false);
        let text = String::from_utf8(translator.feed(stream.as_bytes()).to_vec()).unwrap();
        assert!(
            text.contains("\"Hel\"") && text.contains("\"lo\""),
            "{text}"
        );
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        assert_eq!(translator.malformed(), 1);
    }
}

#[test]
fn a_last_event_without_its_line_end_is_read_at_the_end() {
    let unended = STREAM.strip_suffix("\n\n").unwrap();
    let split = unended.replace(
        "data: {\"type\":\"message_stop\"}",
        "data: {\"type\":\ndata: \"message_stop\"}\n",
    );
    assert_ne!(split, unended);
    for stream in [unended.to_string(), split] {
        let mut translator = StreamTranslator::new("public", true);
        let mut out = translator.feed(stream.as_bytes()).to_vec();
        assert!(!translator.finished());
        out.extend_from_slice(&translator.finish());
        assert!(translator.stopped(), "{stream}");
        assert!(String::from_utf8(out)
            .unwrap()
            .ends_with("data: [DONE]\n\n"));
        assert!(translator.finish().is_empty());
    }
}

#[test]
fn nothing_after_message_stop_is_translated() {
    let error = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";
    let mut translator = StreamTranslator::new("p", false);
    let out = translator.feed(format!("{STREAM}{error}").as_bytes());
    assert!(String::from_utf8_lossy(&out).ends_with("data: [DONE]\n\n"));
    assert!(translator.stopped());
    assert!(translator.feed(error.as_bytes()).is_empty());
    // An error event ends the stream, but not with its answer.
    let mut translator = StreamTranslator::new("p", false);
    translator.feed(error.as_bytes());
    assert!(translator.finished() && !translator.stopped());
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

/// Every chat completions field: translated (what reaches Anthropic), or
/// refused with a 400 naming it. None is dropped without a word.
#[test]
fn every_chat_completions_field_is_translated_or_refused() {
    let base = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    let tool =
        json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
    let schema = json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "string"}}}}});
    // (field, value, Ok(check of the Anthropic body) or Err(param refused))
    type Check = fn(&Value) -> bool;
    let cases: Vec<(&str, Value, Result<Check, &str>)> = vec![
        ("max_tokens", json!(7), Ok(|b| b["max_tokens"] == 7)),
        (
            "max_completion_tokens",
            json!(9),
            Ok(|b| b["max_tokens"] == 9),
        ),
        ("temperature", json!(0.5), Ok(|b| b["temperature"] == 0.5)),
        ("temperature", json!(1.5), Err("temperature")),
        ("top_p", json!(0.9), Ok(|b| b["top_p"] == 0.9)),
        (
            "stop",
            json!("END"),
            Ok(|b| b["stop_sequences"] == json!(["END"])),
        ),
        ("stream", json!(true), Ok(|b| b["stream"] == true)),
        (
            "stream_options",
            json!({"include_usage": true}),
            Ok(|b| b.get("stream_options").is_none()),
        ),
        ("tools", tool.clone(), Ok(|b| b["tools"][0]["name"] == "f")),
        ("tools", json!([{"type": "web_search"}]), Err("tools")),
        (
            "tool_choice",
            json!("required"),
            Ok(|b| b["tool_choice"]["type"] == "any"),
        ),
        (
            "parallel_tool_calls",
            json!(false),
            Ok(|b| b["tool_choice"]["disable_parallel_tool_use"] == true),
        ),
        (
            "parallel_tool_calls",
            json!(true),
            Ok(|b| b.get("tool_choice").is_none()),
        ),
        (
            "response_format",
            schema.clone(),
            Ok(|b| {
                b["tool_choice"]["name"] == STRUCTURED_TOOL
                    && b["tools"][0]["input_schema"]["properties"]["a"]["type"] == "string"
            }),
        ),
        (
            "response_format",
            json!({"type": "json_object"}),
            Ok(|b| b["tools"][0]["input_schema"] == json!({"type": "object"})),
        ),
        (
            "response_format",
            json!({"type": "text"}),
            Ok(|b| b.get("tools").is_none()),
        ),
        (
            "user",
            json!("u-1"),
            Ok(|b| b["metadata"]["user_id"] == "u-1"),
        ),
        (
            "safety_identifier",
            json!("s-1"),
            Ok(|b| b["metadata"]["user_id"] == "s-1"),
        ),
        ("n", json!(1), Ok(|b| b.get("n").is_none())),
        ("n", json!(2), Err("n")),
        (
            "logprobs",
            json!(false),
            Ok(|b| b.get("logprobs").is_none()),
        ),
        ("logprobs", json!(true), Err("logprobs")),
        ("top_logprobs", json!(3), Err("top_logprobs")),
        ("seed", json!(42), Err("seed")),
        (
            "frequency_penalty",
            json!(0),
            Ok(|b| b.get("frequency_penalty").is_none()),
        ),
        ("frequency_penalty", json!(0.5), Err("frequency_penalty")),
        ("presence_penalty", json!(0.5), Err("presence_penalty")),
        (
            "logit_bias",
            json!({}),
            Ok(|b| b.get("logit_bias").is_none()),
        ),
        ("logit_bias", json!({"50256": -100}), Err("logit_bias")),
        ("reasoning_effort", json!("high"), Err("reasoning_effort")),
        ("verbosity", json!("low"), Err("verbosity")),
        ("store", json!(false), Ok(|b| b.get("store").is_none())),
        ("store", json!(true), Err("store")),
        ("metadata", json!({"k": "v"}), Err("metadata")),
        (
            "service_tier",
            json!("auto"),
            Ok(|b| b.get("service_tier").is_none()),
        ),
        (
            "service_tier",
            json!("default"),
            Ok(|b| b["service_tier"] == "standard_only"),
        ),
        ("service_tier", json!("flex"), Err("service_tier")),
        (
            "modalities",
            json!(["text"]),
            Ok(|b| b.get("modalities").is_none()),
        ),
        ("modalities", json!(["text", "audio"]), Err("modalities")),
        ("audio", json!({"voice": "alloy"}), Err("audio")),
        (
            "prediction",
            json!({"type": "content", "content": "x"}),
            Err("prediction"),
        ),
        ("web_search_options", json!({}), Err("web_search_options")),
        ("prompt_cache_key", json!("k"), Err("prompt_cache_key")),
        ("functions", json!([{"name": "f"}]), Err("functions")),
        ("function_call", json!("auto"), Err("function_call")),
        // Not OpenAI's: Anthropic's own, passed on.
        ("top_k", json!(5), Ok(|b| b["top_k"] == 5)),
        (
            "thinking",
            json!({"type": "enabled", "budget_tokens": 1024}),
            Ok(|b| b["thinking"]["budget_tokens"] == 1024),
        ),
    ];
    let covered: std::collections::HashSet<&str> = cases.iter().map(|case| case.0).collect();
    for (field, value, expected) in cases {
        let mut request = base.clone();
        request[field] = value.clone();
        let translated = to_messages_request(request.to_string().as_bytes(), "claude-x");
        match (expected, translated) {
            (Ok(check), Ok(body)) => {
                let body: Value = serde_json::from_slice(&body).unwrap();
                assert!(check(&body), "{field}={value}: {body}");
            }
            (Err(param), Err(error)) => {
                assert_eq!(
                    (error.status, error.param.as_deref()),
                    (400, Some(param)),
                    "{field}={value}"
                );
            }
            (expected, got) => panic!(
                "{field}={value}: expected {:?}, got {:?}",
                expected.map(drop),
                got.map(drop)
            ),
        }
    }
    // Every field the table names is covered above.
    for (field, _) in FIELDS {
        assert!(
            ["model", "messages"].contains(field) || covered.contains(field),
            "{field} is not in the test table"
        );
    }
    // A JSON response_format cannot be combined with tools.
    let mut both = base.clone();
    both["tools"] = tool;
    both["response_format"] = schema;
    let error = to_messages_request(both.to_string().as_bytes(), "m").unwrap_err();
    assert_eq!(error.param.as_deref(), Some("response_format"));
}

#[test]
fn a_json_response_format_comes_back_as_the_content() {
    let answer = json!({
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
        "content": [{"type": "tool_use", "id": "t1", "name": STRUCTURED_TOOL, "input": {"a": "b"}}],
        "stop_reason": "tool_use", "usage": {"input_tokens": 3, "output_tokens": 4},
    });
    let (body, _) = answer_of(&answer);
    let body: Value = serde_json::from_slice(&body).unwrap();
    let choice = &body["choices"][0];
    assert_eq!(choice["message"]["content"], "{\"a\":\"b\"}");
    assert!(choice["message"].get("tool_calls").is_none());
    assert_eq!(choice["finish_reason"], "stop");
    // Streamed: the forced tool's input deltas are the content.
    let events = [
        json!({"type": "message_start", "message": {"id": "msg_2", "usage": {"input_tokens": 3, "output_tokens": 0}}}),
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "t", "name": STRUCTURED_TOOL, "input": {}}}),
        json!({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": "{\"a\":"}}),
        json!({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": "\"b\"}"}}),
        json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 4}}),
        json!({"type": "message_stop"}),
    ];
    let mut translator = StreamTranslator::new("claude", false);
    let input: String = events
        .iter()
        .map(|e| format!("event: {}\ndata: {e}\n\n", e["type"].as_str().unwrap()))
        .collect();
    let out = translator.feed(input.as_bytes());
    let chunks: Vec<Value> = String::from_utf8_lossy(&out)
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str(d).ok())
        .collect();
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "{\"a\":\"b\"}");
    assert!(chunks
        .iter()
        .all(|c| c["choices"][0]["delta"].get("tool_calls").is_none()));
    assert!(chunks
        .iter()
        .any(|c| c["choices"][0]["finish_reason"] == "stop"));
}

#[test]
fn the_readme_table_is_this_table() {
    let readme = include_str!("../../../README.md");
    for (field, what) in FIELDS {
        let row = format!("| `{field}` | {what} |");
        assert!(readme.contains(&row), "README.md lacks: {row}");
    }
}

#[test]
fn a_stream_with_usage_that_cannot_be_billed_by_reports_none() {
    let feed = |stream: &str| {
        let mut translator = StreamTranslator::new("public", false);
        translator.feed(stream.as_bytes());
        translator.usage()
    };
    assert!(feed(STREAM).is_some());
    let impossible = STREAM.replace("\"input_tokens\":12", "\"input_tokens\":1e15");
    assert_eq!(feed(&impossible), None, "an impossible prompt count");
    let negative = STREAM.replace("\"output_tokens\":7", "\"output_tokens\":-7");
    assert_eq!(feed(&negative), None, "a negative completion count");
    // The start's output count is a placeholder: without the final delta's
    // usage the completion is the gateway's to count.
    let no_delta_usage = STREAM.replace(",\"usage\":{\"output_tokens\":7}", "");
    assert_ne!(no_delta_usage, STREAM);
    assert_eq!(feed(&no_delta_usage), None, "no final usage");
}

#[test]
fn the_usage_chunk_of_a_stream_without_usable_usage_is_the_gateways_count() {
    let estimate = prompt_estimate();
    let prompt_count = estimate.prompt_tokens("claude-x");
    let hello = crate::cost::Encoding::for_model("claude-x").count("Hello{\"a\":1}");
    let chunk_usage = |stream: &str| {
        let mut translator =
            StreamTranslator::new("public", true).with_estimate(estimate.clone(), "claude-x");
        let mut out = Vec::new();
        for piece in stream.as_bytes().chunks(29) {
            out.extend_from_slice(&translator.feed(piece));
        }
        let text = String::from_utf8(out).unwrap();
        let last = text
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .filter(|e| *e != "[DONE]")
            .last()
            .map(|e| serde_json::from_str::<Value>(e).unwrap())
            .unwrap();
        let billed = translator.billed_usage();
        assert_eq!(
            last["usage"]["prompt_tokens"], billed.prompt_tokens,
            "{stream}"
        );
        assert_eq!(last["usage"]["completion_tokens"], billed.completion_tokens);
        assert_eq!(last["usage"]["total_tokens"], billed.total());
        billed
    };
    // No usage at all: both halves counted.
    let none = STREAM
        .replace(",\"usage\":{\"output_tokens\":7}", "")
        .replace(
            ",\"usage\":{\"input_tokens\":12,\"output_tokens\":1,\"cache_read_input_tokens\":4}",
            "",
        );
    let billed = chunk_usage(&none);
    assert_eq!(
        (billed.prompt_tokens, billed.completion_tokens),
        (prompt_count, hello)
    );
    assert!(billed.estimated && hello > 0);
    // The prompt's counts came, the completion's did not: the reported
    // prompt, the counted completion.
    let billed = chunk_usage(&STREAM.replace(",\"usage\":{\"output_tokens\":7}", ""));
    assert_eq!(
        (
            billed.prompt_tokens,
            billed.cached_tokens,
            billed.completion_tokens
        ),
        (16, 4, hello)
    );
    // An impossible report: none of it is taken.
    let billed = chunk_usage(&STREAM.replace("\"input_tokens\":12", "\"input_tokens\":1e15"));
    assert_eq!(
        (billed.prompt_tokens, billed.completion_tokens),
        (prompt_count, hello)
    );
    // The start's placeholder output count left out: its prompt counts
    // still stand.
    let billed = chunk_usage(
        &STREAM
            .replace(",\"usage\":{\"output_tokens\":7}", "")
            .replace(",\"output_tokens\":1", ""),
    );
    assert_eq!(
        (
            billed.prompt_tokens,
            billed.cached_tokens,
            billed.completion_tokens
        ),
        (16, 4, hello)
    );
    // A usable report stays the provider's.
    let billed = chunk_usage(STREAM);
    assert_eq!((billed.prompt_tokens, billed.completion_tokens), (16, 7));
    assert!(!billed.estimated);
    // The same answer whole, without usage, is billed as its stream is.
    let (_, whole) = answer_of(&json!({
        "id": "msg_9", "type": "message", "role": "assistant", "stop_reason": "tool_use",
        "content": [{"type": "text", "text": "Hello"},
                    {"type": "tool_use", "id": "tu_1", "name": "f", "input": {"a": 1}}],
    }));
    assert_eq!(
        (whole.prompt_tokens, whole.completion_tokens),
        (prompt_count, hello)
    );
}

#[test]
fn thinking_is_counted_and_unknown_deltas_are_not() {
    let delta = |kind: &str, field: &str, text: &str| {
        format!(
            "event: content_block_delta\ndata: {}\n\n",
            json!({"type": "content_block_delta", "index": 0,
                   "delta": {"type": kind, field: text}})
        )
    };
    let stream = [
        delta("thinking_delta", "thinking", "abcdefgh"),
        delta("signature_delta", "signature", "0123456789abcdef"),
        delta("citations_delta", "text", "ignored text"),
        delta("text_delta", "text", "Hi"),
    ]
    .concat();
    let mut translator = StreamTranslator::new("public", false);
    let out = String::from_utf8(translator.feed(stream.as_bytes()).to_vec()).unwrap();
    assert!(out.contains("\"Hi\"") && !out.contains("abcdefgh") && !out.contains("ignored"));
    // Thinking and the text, not the signature or the unknown delta.
    assert_eq!(
        translator.billed_usage().completion_tokens,
        (8u64 + 2).div_ceil(4)
    );
}

#[test]
fn the_tier_anthropic_reports_is_the_usage_tier() {
    use crate::cost::ServiceTier;
    let answer = |tier: &str| {
        answer_of(&json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
            "content": [{"type": "text", "text": "Hello"}], "stop_reason": "end_turn",
            "usage": {"input_tokens": 10, "output_tokens": 5, "service_tier": tier},
        }))
        .1
        .tier
    };
    assert_eq!(answer("priority"), Some(ServiceTier::Priority));
    assert_eq!(answer("standard"), Some(ServiceTier::Default));
    assert_eq!(answer("batch"), None);
    // A stream says it in its start; its final delta keeps it.
    let stream = STREAM.replace(
        "\"cache_read_input_tokens\":4}",
        "\"cache_read_input_tokens\":4,\"service_tier\":\"priority\"}",
    );
    assert_ne!(stream, STREAM);
    let (_, _, translator) = run_stream(&stream, false, 7);
    let usage = translator.usage().unwrap();
    assert_eq!(
        (usage.completion_tokens, usage.tier),
        (7, Some(ServiceTier::Priority))
    );
    let (_, _, translator) = run(false, 7);
    assert_eq!(translator.usage().unwrap().tier, None);
    // Broken off before its final delta, the gateway counts: at the tier
    // the start named.
    let cut = &stream[..stream.find("event: message_delta").unwrap()];
    let (_, _, translator) = run_stream(cut, false, 5);
    assert!(translator.usage().is_none());
    let counted = translator.billed_usage();
    assert!(counted.estimated);
    assert_eq!(counted.tier, Some(ServiceTier::Priority));
    // An answer whose counts cannot be billed by is counted at its tier.
    let (_, usage) = answer_of(&json!({
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
        "content": [{"type": "text", "text": "Hello"}], "stop_reason": "end_turn",
        "usage": {"input_tokens": -1, "output_tokens": 5, "service_tier": "priority"},
    }));
    assert!(usage.estimated);
    assert_eq!(usage.tier, Some(ServiceTier::Priority));
}
