//! The OpenAI surface beyond chat (#18), through real processes: request
//! ids a model server accepts, provider errors in OpenAI's shape whatever
//! their body, model lookup, the Responses API, moderations, images and
//! audio, compressed answers, and usage counted when the provider gives
//! none.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;

const CHAT: &str = "/v1/chat/completions";

#[test]
fn a_model_server_that_checks_request_ids_accepts_the_gateways() {
    let mock = Mock::start(&["--require-uuid-request-id"]);
    let gw = Gateway::start(&GatewayConfig::new(&mock));
    let resp = gw.post_json(CHAT, TENANT_KEY, &chat("gpt-4o-mini", false));
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    // A client's own id that is no UUID is echoed, and a UUID made from it
    // goes upstream (the same for every attempt).
    let auth = format!("Bearer {TENANT_KEY}");
    let body = chat("gpt-4o-mini", false).to_string();
    let resp = gw.post_raw(
        CHAT,
        &[
            ("authorization", &auth),
            ("x-request-id", "client-trace-42"),
        ],
        body.as_bytes(),
    );
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("x-request-id"), Some("client-trace-42"));
    let upstream = mock.requests().pop().unwrap()["headers"]["x-request-id"].clone();
    assert!(is_uuid(upstream.as_str().unwrap()), "{upstream}");
}

#[test]
fn a_provider_error_that_is_not_openai_shaped_reaches_the_client_in_openai_shape() {
    let mock = Mock::start(&[]);
    let gw = Gateway::start(&GatewayConfig::new(&mock));
    for (fault, status, shows) in [
        (
            json!({"status": 400, "error_body": ""}),
            400,
            "answered 400 with no message",
        ),
        (
            json!({"status": 422, "error_body": "<html><body>Unprocessable\n entity</body></html>"}),
            422,
            "answered 422: <html><body>Unprocessable entity</body></html>",
        ),
        (
            json!({"status": 404, "error_body": "{\"detail\":\"Not Found\"}", "content_type": "application/json"}),
            404,
            "{\"detail\":\"Not Found\"}",
        ),
    ] {
        mock.fault(fault.clone());
        let resp = gw.post_json(CHAT, TENANT_KEY, &chat("gpt-4o-mini", false));
        assert_eq!(resp.status, status, "{fault}");
        let error: Value = resp.json()["error"].clone();
        assert_eq!(error["code"], "upstream_error", "{fault}");
        assert!(
            error["message"].as_str().unwrap().contains(shows),
            "{fault}: {error}"
        );
        assert_eq!(resp.header("content-type"), Some("application/json"));
    }
    // An OpenAI-shaped one passes through as it is.
    mock.fault(json!({"status": 400}));
    let resp = gw.post_json(CHAT, TENANT_KEY, &chat("gpt-4o-mini", false));
    assert_eq!(resp.json()["error"]["type"], "invalid_request_error");
    assert_ne!(resp.json()["error"]["code"], "upstream_error");
}

#[test]
fn a_provider_that_compresses_anyway_is_decoded_and_metered_on_the_plain_answer() {
    let mock = Mock::start(&[]);
    let gw = Gateway::start(&GatewayConfig::new(&mock));
    let mut body = chat("gpt-4o-mini", true);
    body["mock_tokens"] = json!(40);
    body["stream_options"] = json!({"include_usage": true});
    for encoding in ["gzip", "deflate", "br", "zstd"] {
        mock.fault(json!({"compress": encoding}));
        let resp = gw.post_json(CHAT, TENANT_KEY, &chat("gpt-4o-mini", false));
        assert_eq!(
            resp.status,
            200,
            "{encoding}: {}",
            String::from_utf8_lossy(&resp.body)
        );
        assert_eq!(resp.header("content-encoding"), None, "{encoding}");
        let answer = resp.json();
        assert!(answer["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .starts_with("tok0"));
        assert_eq!(answer["usage"]["completion_tokens"], 16, "{encoding}");

        mock.fault(json!({"compress": encoding}));
        let mut text = String::new();
        let mut usage = Value::Null;
        read_sse(gw.port, TENANT_KEY, &body, |data, _| {
            if let Ok(event) = serde_json::from_str::<Value>(data) {
                text.push_str(
                    event["choices"][0]["delta"]["content"]
                        .as_str()
                        .unwrap_or(""),
                );
                if event["usage"].is_object() {
                    usage = event["usage"].clone();
                }
            }
        });
        let expected: String = (0..40).map(|i| format!("tok{i} ")).collect();
        assert_eq!(text, expected, "{encoding}");
        assert_eq!(
            usage["completion_tokens"], 40,
            "{encoding}: the provider's count, read decoded"
        );
    }
    let billed = metric_sum(
        &gw.metrics(),
        "runestone_tokens_total",
        &["kind=\"completion\""],
    );
    assert_eq!(billed, 4.0 * (16.0 + 40.0));
}

#[test]
fn usage_a_provider_does_not_report_is_counted_with_a_tokenizer_and_given_to_a_client_that_asked() {
    let mock = Mock::start(&[]);
    let gw = Gateway::start(&GatewayConfig::new(&mock));
    // 24 tokens asked for and generated; no usage reported.
    let mut body = chat("gpt-4o-mini", true);
    body["max_tokens"] = json!(24);
    body["mock_tokens"] = json!(24);
    body["stream_options"] = json!({"include_usage": true});
    mock.fault(json!({"no_usage": true}));
    let mut events = Vec::new();
    read_sse(gw.port, TENANT_KEY, &body, |data, _| {
        events.push(data.to_owned())
    });
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let usage_chunk: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    let usage = &usage_chunk["usage"];
    assert_eq!(usage_chunk["choices"], json!([]), "{usage_chunk}");
    assert_eq!(usage_chunk["object"], "chat.completion.chunk");
    assert!(usage_chunk["id"]
        .as_str()
        .unwrap()
        .starts_with("chatcmpl-mock"));
    // "tok0 tok1 ..." is more tokens than words, but never more than asked.
    assert_eq!(usage["completion_tokens"], 24, "{usage}");
    // "Say hello", and the chat format's few tokens; not bytes / 4.
    let prompt = usage["prompt_tokens"].as_u64().unwrap();
    assert!((5..15).contains(&prompt), "{usage}");
    let metrics = gw.metrics();
    assert_eq!(
        metric_sum(&metrics, "runestone_tokens_total", &["kind=\"prompt\""]),
        prompt as f64,
        "billed what the client was told"
    );
    assert_eq!(
        metric_sum(&metrics, "runestone_tokens_total", &["kind=\"completion\""]),
        24.0
    );
    let chat_line = || {
        gw.log()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|l| l["type"] == "access" && l["endpoint"] == "chat")
    };
    wait_until(Duration::from_secs(5), "the access log line", || {
        chat_line().is_some()
    });
    let line = chat_line().unwrap();
    assert_eq!(line["usage_estimated"], true, "{line}");

    // A client that did not ask gets no usage chunk; a JSON answer is
    // counted the same way.
    mock.fault(json!({"no_usage": true}));
    body["stream_options"] = Value::Null;
    let mut events = Vec::new();
    read_sse(gw.port, TENANT_KEY, &body, |data, _| {
        events.push(data.to_owned())
    });
    assert!(
        events.iter().all(|e| !e.contains("\"usage\":{")),
        "{events:?}"
    );
    mock.fault(json!({"no_usage": true}));
    let mut json_body = chat("gpt-4o-mini", false);
    json_body["max_tokens"] = json!(24);
    json_body["mock_tokens"] = json!(24);
    let before = metric_sum(
        &gw.metrics(),
        "runestone_tokens_total",
        &["kind=\"completion\""],
    );
    assert_eq!(gw.post_json(CHAT, TENANT_KEY, &json_body).status, 200);
    let after = metric_sum(
        &gw.metrics(),
        "runestone_tokens_total",
        &["kind=\"completion\""],
    );
    assert_eq!(after - before, 24.0);
    // /v1/usage says how many of the period's requests were counted so.
    let usage = gw.get("/v1/usage", Some(TENANT_KEY)).json();
    assert_eq!(usage["estimated_requests"], 3, "{usage}");
    assert_eq!(usage["requests"], 3);
}

#[test]
fn a_responses_answer_without_usage_is_counted_from_its_output() {
    let mock = Mock::start(&[]);
    let gw = Gateway::start(&GatewayConfig::new(&mock));
    let completion = || {
        metric_sum(
            &gw.metrics(),
            "runestone_tokens_total",
            &["kind=\"completion\""],
        )
    };
    let body = json!({"model": "gpt-4o-mini", "input": "Say hello", "mock_tokens": 24, "max_output_tokens": 24});
    // Reported: billed as reported.
    assert_eq!(gw.post_json("/v1/responses", TENANT_KEY, &body).status, 200);
    assert_eq!(completion(), 24.0);
    // Not reported: the output text is counted ("tok0 tok1 ..." is more
    // tokens than words, but never more than the mock generated), not 0.
    mock.fault(json!({"no_usage": true}));
    let answer = gw.post_json("/v1/responses", TENANT_KEY, &body);
    assert_eq!(answer.status, 200);
    assert!(answer.json().get("usage").is_none(), "the mock sent none");
    assert_eq!(completion() - 24.0, 24.0);
    let usage = gw.get("/v1/usage", Some(TENANT_KEY)).json();
    assert_eq!(usage["estimated_requests"], 1, "{usage}");
}

/// A config with two provider accounts behind `gpt` (round robin), tenants
/// listed in `order`, sharing `redis`.
fn responses_config(a: &Mock, b: &Mock, redis: &Redis, order: [&str; 2]) -> GatewayConfig {
    let mut config = GatewayConfig::new(a);
    config.providers = vec![
        format!(
            "  - {{ name: acct-a, base_url: \"{}\", api_key: \"{PROVIDER_KEY}\" }}",
            a.base_url()
        ),
        format!(
            "  - {{ name: acct-b, base_url: \"{}\", api_key: \"{PROVIDER_KEY}\" }}",
            b.base_url()
        ),
    ];
    config.models = "
  - name: gpt
    strategy: round_robin
    targets: [{ provider: acct-a, model: m }, { provider: acct-b, model: m }]
"
    .into();
    let tenant = |id: &str| {
        let key = if id == "acme" { TENANT_KEY } else { OTHER_KEY };
        format!("\n  - id: {id}\n    keys: [\"{key}\"]")
    };
    config.tenants = format!("{}{}\n", tenant(order[0]), tenant(order[1]));
    config.extra = redis.section();
    config
}

const OTHER_KEY: &str = "sk-other-tenant-key-for-responses";

#[test]
fn stored_responses_are_the_creating_tenants_on_every_instance_and_after_a_restart() {
    let (a, b) = (Mock::start(&[]), Mock::start(&[]));
    let redis = Redis::start();
    let one = Gateway::start(&responses_config(&a, &b, &redis, ["acme", "globex"]));
    let mut ids = Vec::new();
    for _ in 0..4 {
        let resp = one.post_json(
            "/v1/responses",
            TENANT_KEY,
            &json!({"model": "gpt", "input": "hello", "max_output_tokens": 3}),
        );
        assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
        ids.push(resp.json()["id"].as_str().unwrap().to_string());
    }
    assert!(redis
        .cli(&["EXISTS", &format!("runestone:{{acme}}:response:{}", ids[0])])
        .trim()
        .ends_with('1'));
    // Another instance, with the tenants in the other order.
    let two = Gateway::start(&responses_config(&a, &b, &redis, ["globex", "acme"]));
    for id in &ids {
        let path = format!("/v1/responses/{id}");
        let mine = two.get(&path, Some(TENANT_KEY));
        assert_eq!(mine.status, 200, "{}", String::from_utf8_lossy(&mine.body));
        assert_eq!(mine.json()["id"], id.as_str());
        let theirs = two.get(&path, Some(OTHER_KEY));
        assert_eq!(theirs.status, 404);
        assert_eq!(theirs.error_code(), "response_not_found");
        // A follow-up on the second instance reaches the account holding
        // the first response (the other would refuse it).
        let follow = two.post_json(
            "/v1/responses",
            TENANT_KEY,
            &json!({"model": "gpt", "input": "more", "previous_response_id": id}),
        );
        assert_eq!(
            follow.status,
            200,
            "{}",
            String::from_utf8_lossy(&follow.body)
        );
        let theirs = two.post_json(
            "/v1/responses",
            OTHER_KEY,
            &json!({"model": "gpt", "input": "more", "previous_response_id": id}),
        );
        assert_eq!(theirs.status, 404);
    }
    // Reading them billed nothing: only the creations and follow-ups did.
    let usage = two.get("/v1/usage", Some(TENANT_KEY)).json();
    assert_eq!(usage["completion_tokens"], json!(4 * 3 + 4 * 16));
}

#[test]
fn a_stored_response_call_answered_empty_is_the_providers_acknowledgement() {
    // Deleting a stored response: a server that acknowledges with an empty
    // 200 has done it (no other deployment holds it, and nothing was
    // generated), unlike a generation answered empty.
    let (a, b) = (Mock::start(&[]), Mock::start(&[]));
    let redis = Redis::start();
    let gw = Gateway::start(&responses_config(&a, &b, &redis, ["acme", "globex"]));
    let resp = gw.post_json(
        "/v1/responses",
        TENANT_KEY,
        &json!({"model": "gpt", "input": "hello", "max_output_tokens": 3}),
    );
    let id = resp.json()["id"].as_str().unwrap().to_string();
    let path = format!("/v1/responses/{id}");
    for mock in [&a, &b] {
        mock.fault(json!({"status": 200, "error_body": "", "content_type": "application/json", "path": path}));
    }
    let auth = format!("Bearer {TENANT_KEY}");
    let deleted = call("DELETE", &gw.url(&path), &[("authorization", &auth)], None);
    assert_eq!(
        deleted.status,
        200,
        "{}",
        String::from_utf8_lossy(&deleted.body)
    );
    assert!(deleted.body.is_empty());
    // The gateway's record went with it (forgotten once the answer is
    // written: looked for until then).
    let key = format!("runestone:{{acme}}:response:{id}");
    let mut kept = String::new();
    for _ in 0..200 {
        kept = redis.cli(&["EXISTS", &key]);
        if kept.trim().ends_with('0') {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(kept.trim().ends_with('0'), "{kept}");
}

#[test]
fn a_lookup_redis_cannot_answer_is_a_503_but_what_this_instance_recorded_still_serves() {
    let (a, b) = (Mock::start(&[]), Mock::start(&[]));
    let redis = Redis::start();
    let mut config = responses_config(&a, &b, &redis, ["acme", "globex"]);
    config.extra = format!("redis: {{ url: \"{}\", timeout_ms: 100 }}\n", redis.url());
    let gw = Gateway::start(&config);
    let resp = gw.post_json(
        "/v1/responses",
        TENANT_KEY,
        &json!({"model": "gpt", "input": "hello"}),
    );
    let id = resp.json()["id"].as_str().unwrap().to_string();
    redis.freeze();
    // Known in process: still served.
    let mine = gw.get(&format!("/v1/responses/{id}"), Some(TENANT_KEY));
    assert_eq!(mine.status, 200, "{}", String::from_utf8_lossy(&mine.body));
    // Unknown here and Redis cannot say: 503 with a retry hint, not a 404.
    let other = gw.get("/v1/responses/resp_elsewhere", Some(TENANT_KEY));
    redis.thaw();
    assert_eq!(other.status, 503);
    assert_eq!(other.error_code(), "response_store_unavailable");
    assert!(other.header("retry-after").is_some());
}

/// A multipart form of `parts` (Content-Disposition parameters, value)
/// under the boundary `AAA`.
fn form(parts: &[(&str, &str)]) -> Vec<u8> {
    let mut body = String::new();
    for (disposition, value) in parts {
        body.push_str(&format!(
            "--AAA\r\nContent-Disposition: form-data; {disposition}\r\n\r\n{value}\r\n"
        ));
    }
    body.push_str("--AAA--\r\n");
    body.into_bytes()
}

#[test]
fn an_upload_goes_upstream_as_the_gateway_read_it_and_an_ambiguous_one_is_refused() {
    let mock = Mock::start(&[]);
    let gw = Gateway::start(&GatewayConfig::new(&mock));
    let auth = format!("Bearer {TENANT_KEY}");
    let path = "/v1/audio/transcriptions";
    let file = ("name=\"file\"; filename=\"a.wav\"", "RIFFdata");
    let send = |content_type: &str, body: &[u8]| {
        gw.post_raw(
            path,
            &[("authorization", &auth), ("content-type", content_type)],
            body,
        )
    };
    let plain = "multipart/form-data; boundary=AAA";
    let resp = send(plain, &form(&[("name=\"model\"", "gpt-4o-mini"), file]));
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let seen = mock.requests().pop().unwrap();
    assert_eq!(seen["model"], "mock-small");
    let sent_type = seen["headers"]["content-type"].as_str().unwrap();
    assert!(
        sent_type.starts_with("multipart/form-data; boundary=runestone-"),
        "{sent_type}"
    );
    // Forms a provider's parser could read another model from.
    let before = mock.request_count();
    let ambiguous = [
        (
            plain,
            form(&[
                ("name=\"model\"", "gpt-4o-mini"),
                ("name=\"file\"; name=\"model\"", "same-name"),
                file,
            ]),
        ),
        (
            plain,
            form(&[
                ("name=\"model\"", "gpt-4o-mini"),
                ("NAME=\"model\"", "same-name"),
                file,
            ]),
        ),
        (
            plain,
            form(&[
                ("name=\"model\"", "gpt-4o-mini"),
                ("name*=UTF-8''model", "same-name"),
                file,
            ]),
        ),
        (
            "multipart/form-data; boundary=BBB; boundary=AAA",
            form(&[("name=\"model\"", "gpt-4o-mini"), file]),
        ),
        (
            plain,
            [
                b"preamble\r\n".as_slice(),
                &form(&[("name=\"model\"", "gpt-4o-mini"), file]),
            ]
            .concat(),
        ),
    ];
    for (content_type, body) in ambiguous {
        let resp = send(content_type, &body);
        assert_eq!(resp.status, 400, "{}", String::from_utf8_lossy(&body));
        assert_eq!(resp.json()["error"]["type"], "invalid_request_error");
    }
    assert_eq!(
        mock.request_count(),
        before,
        "nothing ambiguous went upstream"
    );
}
