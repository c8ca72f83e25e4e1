//! Unit tests of the pure parts: parsing, bodies, streams, faults.

use super::*;

fn parse_event(event: &str) -> Value {
    let json = event
        .strip_prefix("data: ")
        .and_then(|e| e.strip_suffix("\n\n"))
        .expect("SSE framing");
    serde_json::from_str(json).expect("valid JSON event")
}

#[test]
fn chat_prompt_tokens_count_bytes_and_messages() {
    let g = parse_chat(
        br#"{"model":"m","messages":[{"role":"user","content":"hello"}]}"#,
        None,
    )
    .unwrap();
    // ceil(5/4) = 2, + 4 for the message
    assert_eq!(g.prompt_tokens, 6);
    let g = parse_chat(
        br#"{"model":"m","messages":[
            {"role":"system","content":"abcd"},
            {"role":"user","content":[{"type":"text","text":"abcd"},{"type":"image_url","image_url":{"url":"x"}}]},
            {"role":"assistant","content":null}]}"#,
        None,
    )
    .unwrap();
    assert_eq!(g.prompt_tokens, 2 + 12);
    assert_eq!(parse_chat(b"{}", None).unwrap().prompt_tokens, 1);
}

#[test]
fn completion_and_embedding_prompt_tokens() {
    assert_eq!(completion_prompt_tokens(Some(&json!("abcde"))), 2);
    assert_eq!(completion_prompt_tokens(Some(&json!(["ab", "cd", "e"]))), 2);
    assert_eq!(completion_prompt_tokens(Some(&json!([1, 2, 3]))), 3);
    assert_eq!(completion_prompt_tokens(None), 1);
    let e = parse_embeddings(br#"{"model":"e","input":["abcd","abcde"]}"#, None).unwrap();
    assert_eq!(e.prompt_tokens, 3);
    assert_eq!(e.vectors.len(), 2);
    let e = parse_embeddings(br#"{"input":[1,2,3]}"#, Some("dep")).unwrap();
    assert_eq!((e.vectors.len(), e.prompt_tokens), (1, 3));
    assert_eq!(e.model.as_deref(), Some("dep"));
    assert!(parse_embeddings(br#"{"input":{}}"#, None).is_err());
    assert!(parse_embeddings(br#"{"model":"x"}"#, None).is_err());
}

#[test]
fn reply_length_and_finish_reason() {
    assert_eq!(
        plan(None, &[None, None]),
        Plan {
            tokens: 16,
            finish_reason: "stop"
        }
    );
    assert_eq!(plan(None, &[Some(5), None]).finish_reason, "length");
    assert_eq!(plan(None, &[Some(50), Some(3)]).tokens, 3);
    assert_eq!(plan(Some(1000), &[None]).tokens, 1000);
    assert_eq!(plan(Some(1000), &[Some(1000)]).finish_reason, "stop");
    assert_eq!(plan(Some(u64::MAX), &[None]).tokens, MAX_MOCK_TOKENS);
    assert_eq!(reply_text(0, 3), "tok0 tok1 tok2");
    assert_eq!(reply_text(0, 0), "");
}

#[test]
fn json_errors_are_classified() {
    let e = parse_chat(b"{not json", None).unwrap_err();
    assert_eq!((e.status, e.code), (400, Some("invalid_json")));
    let e = parse_chat(br#"{"messages": 3}"#, None).unwrap_err();
    assert_eq!(e.code, Some("invalid_request"));
    let body: Value = serde_json::from_slice(&e.body()).unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(body["error"]["param"].is_null());
    assert_eq!(
        String::from_utf8(error_json(
            "Incorrect API key provided",
            "invalid_request_error",
            Some("invalid_api_key")
        ))
        .unwrap(),
        r#"{"error":{"message":"Incorrect API key provided","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#
    );
}

#[test]
fn chat_stream_events_are_valid_json() {
    let m = ChunkMeta::new(
        StreamKind::Chat,
        "chatcmpl-mock-7",
        42,
        "we\"ird",
        true,
        None,
    );
    let role = parse_event(&m.role_event());
    assert_eq!(role["object"], "chat.completion.chunk");
    assert_eq!(role["model"], "we\"ird");
    assert_eq!(role["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(role["choices"][0]["delta"]["content"], "");
    assert!(role["usage"].is_null() && role.get("usage").is_some());
    let tok = parse_event(&m.token_event(3));
    assert_eq!(tok["choices"][0]["delta"]["content"], "tok3 ");
    assert!(tok["choices"][0]["finish_reason"].is_null());
    let fin = parse_event(&m.finish_event("length"));
    assert_eq!(fin["choices"][0]["finish_reason"], "length");
    assert_eq!(fin["choices"][0]["delta"], json!({}));
    let usage = parse_event(&m.usage_event(10, 4));
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["total_tokens"], 14);
    assert_eq!(usage["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(usage["id"], "chatcmpl-mock-7");
    assert_eq!(usage["created"], 42);

    let plain = ChunkMeta::new(StreamKind::Chat, "c", 1, "m", false, None);
    assert!(parse_event(&plain.token_event(0)).get("usage").is_none());
}

#[test]
fn completion_stream_events_are_valid_json() {
    let m = ChunkMeta::new(StreamKind::Completion, "cmpl-mock-1", 1, "m", true, None);
    let tok = parse_event(&m.token_event(0));
    assert_eq!(tok["object"], "text_completion");
    assert_eq!(tok["choices"][0]["text"], "tok0 ");
    let fin = parse_event(&m.finish_event("stop"));
    assert_eq!(fin["choices"][0]["text"], "");
    assert_eq!(fin["choices"][0]["finish_reason"], "stop");
    let usage = parse_event(&m.usage_event(3, 2));
    assert!(usage["usage"].get("prompt_tokens_details").is_none());
}

#[test]
fn non_stream_bodies_have_openai_shape() {
    let g = parse_chat(br#"{"model":"gpt-x","messages":[],"max_tokens":2}"#, None).unwrap();
    let v: Value =
        serde_json::from_slice(&chat_completion_body("chatcmpl-mock-1", 5, "gpt-x", &g)).unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], "tok0 tok1");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 2);
    assert_eq!(v["usage"]["total_tokens"], 3);
    let e = parse_embeddings(br#"{"input":"abc"}"#, None).unwrap();
    let v: Value = serde_json::from_slice(&embeddings_body("m", &e)).unwrap();
    assert_eq!(
        v["data"][0]["embedding"].as_array().unwrap().len(),
        EMBEDDING_DIMS
    );
    assert_eq!(v["usage"], json!({"prompt_tokens": 1, "total_tokens": 1}));
}

#[test]
fn fault_queue_is_fifo_with_counts_and_paths() {
    let mut q = FaultQueue::default();
    let status = |s| Fault::Status {
        status: s,
        retry_after: None,
        retry_after_ms: None,
    };
    q.push(QueuedFault {
        fault: status(503),
        remaining: 2,
        path: None,
        model: None,
    });
    q.push(QueuedFault {
        fault: Fault::DropConnection,
        remaining: 1,
        path: Some("/v1/embeddings".into()),
        model: None,
    });
    q.push(QueuedFault {
        fault: status(429),
        remaining: 1,
        path: None,
        model: None,
    });
    assert_eq!(q.pending(), 4);
    assert_eq!(q.take("/v1/chat/completions", None), Some(status(503)));
    assert_eq!(q.take("/v1/chat/completions", None), Some(status(503)));
    // the embeddings-only fault is skipped for other paths
    assert_eq!(q.take("/v1/chat/completions", None), Some(status(429)));
    assert_eq!(q.take("/v1/chat/completions", None), None);
    assert_eq!(q.take("/v1/embeddings", None), Some(Fault::DropConnection));
    // A fault for one model waits for a request naming it.
    q.push(QueuedFault {
        fault: status(500),
        remaining: 1,
        path: None,
        model: Some("big".into()),
    });
    assert_eq!(q.take("/v1/chat/completions", Some("small")), None);
    assert_eq!(q.take("/v1/chat/completions", None), None);
    assert_eq!(
        q.take("/v1/chat/completions", Some("big")),
        Some(status(500))
    );
    assert_eq!(q.pending(), 0);
}

#[test]
fn fault_specs_are_validated() {
    let (lat, f) = parse_faults(br#"{"status":503,"count":3}"#).unwrap();
    assert_eq!(lat, None);
    assert_eq!(f[0].remaining, 3);
    let (_, f) = parse_faults(br#"{"stall_ms":10}"#).unwrap();
    assert_eq!(
        f[0].fault,
        Fault::Stall {
            after_chunks: 0,
            stall_ms: 10
        }
    );
    let (_, f) = parse_faults(br#"{"stall_after_chunks":2}"#).unwrap();
    assert_eq!(
        f[0].fault,
        Fault::Stall {
            after_chunks: 2,
            stall_ms: DEFAULT_STALL_MS
        }
    );
    let (_, f) = parse_faults(br#"{"error_after_chunks":2,"linger_ms":900}"#).unwrap();
    assert_eq!(
        f[0].fault,
        Fault::ErrorEvent {
            after_chunks: 2,
            linger_ms: Some(900),
            code: None
        }
    );
    let (_, f) =
        parse_faults(br#"{"error_after_chunks":1,"error_code":"invalid_prompt"}"#).unwrap();
    assert_eq!(
        f[0].fault,
        Fault::ErrorEvent {
            after_chunks: 1,
            linger_ms: None,
            code: Some("invalid_prompt".to_owned())
        }
    );
    assert!(parse_faults(br#"{"error_code":"invalid_prompt"}"#).is_err());
    let (lat, f) = parse_faults(br#"{"latency_ms":250}"#).unwrap();
    assert_eq!((lat, f.len()), (Some(250), 0));
    let (_, f) =
        parse_faults(br#"[{"error_body":"<html>"},{"disconnect_after_chunks":1}]"#).unwrap();
    assert_eq!(f.len(), 2);
    assert!(matches!(f[0].fault, Fault::RawError { status: 500, .. }));
    for bad in [
        &br#"{}"#[..],
        br#"{"status":503,"disconnect_after_chunks":1}"#,
        br#"{"error_body":"x","stall_ms":1}"#,
        br#"{"error_after_chunks":1,"stall_ms":1}"#,
        br#"{"status":99}"#,
        br#"{"status":503,"count":0}"#,
        br#"{"stauts":503}"#,
        br#"{"disconnect_after_chunks":1,"retry_after":2}"#,
        br#"[{"status":503},{"bogus":1}]"#,
        b"nope",
        b"3",
    ] {
        assert!(
            parse_faults(bad).is_err(),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
}

#[test]
fn routing() {
    assert_eq!(
        route(&Method::POST, "/v1/chat/completions"),
        Route::Chat(None)
    );
    assert_eq!(route(&Method::GET, "/v1/chat/completions"), Route::NotFound);
    assert_eq!(route(&Method::GET, "/v1/models"), Route::Models);
    assert_eq!(route(&Method::GET, "/v1/models/abc"), Route::Model("abc"));
    assert_eq!(
        route(&Method::POST, "/openai/deployments/gpt4/chat/completions"),
        Route::Chat(Some("gpt4"))
    );
    assert_eq!(route(&Method::POST, "/v1/foo"), Route::NotFound);
}

#[test]
fn embeddings_are_deterministic_unit_vectors() {
    let a = embed(b"hello");
    assert_eq!(a, embed(b"hello"));
    assert_ne!(a, embed(b"hellp"));
    let norm: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5);
}

#[test]
fn base64_matches_reference() {
    assert_eq!(base64_encode(b""), "");
    assert_eq!(base64_encode(b"f"), "Zg==");
    assert_eq!(base64_encode(b"fo"), "Zm8=");
    assert_eq!(base64_encode(b"foo"), "Zm9v");
    assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
}

#[test]
fn recorded_headers_join_duplicates() {
    let mut headers = HeaderMap::new();
    headers.append("x-a", "1".parse().unwrap());
    headers.append("x-a", "2".parse().unwrap());
    headers.insert("authorization", "Bearer k".parse().unwrap());
    let r = RecordedRequest {
        method: Method::POST,
        path: "/v1/chat/completions".into(),
        query: None,
        headers,
        body_bytes: 0,
        body_sha256: Sha256::digest(b"").into(),
        model: Some("m".into()),
        prefilled: false,
        at_ms: 1,
    };
    let v = r.to_json();
    assert_eq!(v["headers"]["x-a"], "1, 2");
    assert_eq!(v["headers"]["authorization"], "Bearer k");
    assert_eq!(
        v["body_sha256"],
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
}
