//! The gateway core through real processes: routing, authentication, body
//! forwarding at every size, streaming, errors, headers, local endpoints,
//! metrics, and the `check` / `hash-key` commands.

mod common;

use common::*;
use serde_json::json;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

fn setup() -> (Mock, Gateway) {
    let mock = Mock::start(&["--api-key", PROVIDER_KEY]);
    let gw = Gateway::start(&GatewayConfig::new(&mock));
    (mock, gw)
}

#[test]
fn routes_chat_by_model_with_the_provider_model_name_and_key() {
    let (mock, gw) = setup();
    let resp = gw.post_json(
        "/v1/chat/completions",
        TENANT_KEY,
        &chat("gpt-4o-mini", false),
    );
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let body = resp.json();
    assert_eq!(body["object"], "chat.completion");
    assert!(body["choices"][0]["message"]["content"].is_string());
    assert_eq!(resp.header("x-runestone-provider"), Some("mock"));
    let id = resp.header("x-request-id").unwrap().to_string();
    assert!(is_uuid(&id), "{id}");

    let seen = &mock.requests()[0];
    assert_eq!(
        seen["headers"]["x-request-id"],
        id.as_str(),
        "the same id upstream"
    );
    assert_eq!(seen["path"], "/v1/chat/completions");
    assert_eq!(
        seen["model"], "mock-small",
        "provider model name substituted"
    );
    assert_eq!(
        seen["headers"]["authorization"],
        format!("Bearer {PROVIDER_KEY}")
    );
    let all_headers = seen["headers"].to_string();
    assert!(
        !all_headers.contains(TENANT_KEY),
        "tenant key reached the provider: {all_headers}"
    );
}

#[test]
fn serves_completions_and_embeddings() {
    let (mock, gw) = setup();
    let resp = gw.post_json(
        "/v1/completions",
        TENANT_KEY,
        &json!({"model": "gpt-4o-mini", "prompt": "Once"}),
    );
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json()["object"], "text_completion");
    let resp = gw.post_json(
        "/v1/embeddings",
        TENANT_KEY,
        &json!({"model": "text-embedding-3-small", "input": ["a", "b"]}),
    );
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json()["data"].as_array().unwrap().len(), 2);
    let paths: Vec<String> = mock
        .requests()
        .iter()
        .map(|r| r["path"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(paths, ["/v1/completions", "/v1/embeddings"]);
}

#[test]
fn accepts_the_key_in_x_api_key() {
    let (_mock, gw) = setup();
    let body = chat("gpt-4o-mini", false).to_string();
    let resp = gw.post_raw(
        "/v1/chat/completions",
        &[("x-api-key", TENANT_KEY)],
        body.as_bytes(),
    );
    assert_eq!(resp.status, 200);
}

#[test]
fn forwards_bodies_whole_at_every_size_up_to_the_limit() {
    let (mock, gw) = setup();
    for size in [10usize, 70 * 1024, 1024 * 1024, 4 * 1024 * 1024 - 200] {
        let filler = "x".repeat(size.saturating_sub(120));
        // The SDKs put `model` after `messages`: routing must read it all.
        let body = format!(
            r#"{{"messages":[{{"role":"user","content":"{filler}"}}],"model":"same-name"}}"#
        );
        let resp = gw.post_raw(
            "/v1/chat/completions",
            &[("authorization", &format!("Bearer {TENANT_KEY}"))],
            body.as_bytes(),
        );
        assert_eq!(
            resp.status,
            200,
            "size {size}: {}",
            String::from_utf8_lossy(&resp.body)
        );
        let seen = mock.requests().pop().unwrap();
        assert_eq!(seen["body_bytes"], body.len(), "size {size}");
        assert_eq!(
            seen["body_sha256"],
            hex::encode(Sha256::digest(body.as_bytes())),
            "size {size}"
        );
    }
    // A renamed model at 1 MiB: spliced, not truncated.
    let filler = "y".repeat(1024 * 1024);
    let body = json!({"messages": [{"role": "user", "content": filler}], "model": "gpt-4o-mini"});
    let resp = gw.post_json("/v1/chat/completions", TENANT_KEY, &body);
    assert_eq!(resp.status, 200);
    let expected = body
        .to_string()
        .replace("\"gpt-4o-mini\"", "\"mock-small\"");
    let seen = mock.requests().pop().unwrap();
    assert_eq!(
        seen["body_sha256"],
        hex::encode(Sha256::digest(expected.as_bytes()))
    );
    assert_eq!(seen["model"], "mock-small");
}

#[test]
fn refuses_bodies_over_the_limit_declared_or_chunked() {
    let mock = Mock::start(&[]);
    let mut config = GatewayConfig::new(&mock);
    config.max_body = 64 * 1024;
    let gw = Gateway::start(&config);
    let big = format!(
        r#"{{"model":"same-name","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "z".repeat(100 * 1024)
    );
    // Several MiB, more than the sockets' buffers hold: the client is still
    // sending when the answer is written, and must still get to read it.
    let huge = big.repeat(40);
    for body in [&huge, &big] {
        let resp = gw.post_raw(
            "/v1/chat/completions",
            &[("authorization", &format!("Bearer {TENANT_KEY}"))],
            body.as_bytes(),
        );
        assert_eq!(
            (resp.status, resp.error_code()),
            (413, "request_too_large".to_string())
        );
    }

    // Chunked: no declared length, the limit is enforced while reading.
    for body in [&big, &huge] {
        let request = chunked_chat_request(body.as_bytes());
        let answer = raw_exchange(gw.port, &request, Duration::from_secs(5));
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert!(answer.contains("request_too_large"), "{answer}");
    }
    assert_eq!(
        mock.request_count(),
        0,
        "nothing over the limit reaches the provider"
    );

    // Refused before its body was needed (a wrong key): the client still
    // sending reads the answer; a body that never comes is not waited for,
    // the connection closes after the answer.
    let resp = gw.post_raw(
        "/v1/chat/completions",
        &[("authorization", "Bearer not-a-tenant-key")],
        huge.as_bytes(),
    );
    assert_eq!(resp.status, 401);
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    stream
        .write_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n\
              Authorization: Bearer not-a-tenant-key\r\nContent-Length: 1000000000\r\n\r\n",
        )
        .unwrap();
    let mut answer = Vec::new();
    let read = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(
        read.is_ok(),
        "the connection was held open for a body that never came: {read:?}"
    );

    // A slower upload (4 MiB over about three seconds) still reads its
    // answer: the body is thrown away while it keeps coming.
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n\
         Authorization: Bearer not-a-tenant-key\r\nContent-Length: {}\r\n\r\n",
        huge.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    for piece in huge.as_bytes().chunks(huge.len().div_ceil(15)) {
        std::thread::sleep(Duration::from_millis(200));
        stream
            .write_all(piece)
            .expect("the gateway stopped reading a body that kept coming");
    }
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");

    // A local answer (the model list) to a request with a body it never
    // reads: the same.
    let resp = ureq::get(&gw.url("/v1/models"))
        .set("authorization", &format!("Bearer {TENANT_KEY}"))
        .send_bytes(huge.as_bytes())
        .expect("the model list, not a broken pipe");
    assert_eq!(resp.status(), 200);
}

#[test]
fn says_100_continue_to_a_client_that_waits_for_it() {
    let (_mock, gw) = setup();
    let body = chat("gpt-4o-mini", false).to_string();
    let mut stream = connect(gw.port);
    let head = |version: &str| {
        format!(
            "POST /v1/chat/completions HTTP/{version}\r\nHost: gw\r\n\
             Authorization: Bearer {TENANT_KEY}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nExpect: 100-continue\r\n\r\n",
            body.len()
        )
    };
    stream.write_all(head("1.1").as_bytes()).unwrap();
    let interim = read_head(&mut stream);
    assert!(interim.starts_with("HTTP/1.1 100"), "{interim}");
    stream.write_all(body.as_bytes()).unwrap();
    let answer = read_head(&mut stream);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let length = content_length(&answer).expect("a content-length");
    let mut rest = vec![0u8; length];
    stream.read_exact(&mut rest).unwrap();

    // The interim answer does not end the connection: the next request on
    // it is served.
    stream
        .write_all(
            format!(
                "GET /v1/models HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {TENANT_KEY}\r\n\
                 Connection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .unwrap();
    let next = read_head(&mut stream);
    assert!(next.starts_with("HTTP/1.1 200"), "{next}");

    // HTTP/1.0 has no interim answers (RFC 9110 10.1.1): the body is
    // waited for, then the answer.
    let mut stream = connect(gw.port);
    stream.write_all(head("1.0").as_bytes()).unwrap();
    stream.write_all(body.as_bytes()).unwrap();
    let answer = read_head(&mut stream);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[test]
fn a_stream_is_chunked_and_its_connection_kept() {
    let (_mock, gw) = setup();
    let body = chat("gpt-4o-mini", true).to_string();
    let request = |version: &str| {
        format!(
            "POST /v1/chat/completions HTTP/{version}\r\nHost: gw\r\n\
             Authorization: Bearer {TENANT_KEY}\r\nContent-Type: application/json\r\n\
             Connection: keep-alive\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let mut stream = connect(gw.port);
    // Two streams on one connection: each framed in chunks, so the
    // client knows where it ends without the connection closing.
    for _ in 0..2 {
        stream.write_all(request("1.1").as_bytes()).unwrap();
        let head = read_head(&mut stream).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(head.contains("transfer-encoding: chunked\r\n"), "{head}");
        assert!(!head.contains("connection: close"), "{head}");
        let events = String::from_utf8(read_chunked(&mut stream)).unwrap();
        assert!(events.ends_with("data: [DONE]\n\n"), "{events}");
    }

    // HTTP/1.0 cannot read chunks: the stream ends with the connection,
    // and the head says so, though keep-alive was asked for.
    let answer = raw_exchange(gw.port, request("1.0").as_bytes(), Duration::from_secs(10));
    let (head, events) = answer.split_once("\r\n\r\n").expect("a head");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let head = head.to_ascii_lowercase();
    assert!(!head.contains("transfer-encoding"), "{head}");
    assert!(head.contains("\r\nconnection: close"), "{head}");
    assert!(events.ends_with("data: [DONE]\n\n"), "{events}");
}

#[test]
fn streams_chunk_by_chunk_while_the_provider_generates() {
    // 20 tokens at 10 tokens/s: the provider needs about two seconds.
    let mock = Mock::start(&["--tokens-per-second", "10"]);
    let gw = Gateway::start(&GatewayConfig::new(&mock));
    let mut body = chat("gpt-4o-mini", true);
    body["mock_tokens"] = json!(20);
    let mut arrivals = Vec::new();
    let mut events = Vec::new();
    let status = read_sse(gw.port, TENANT_KEY, &body, |data, at| {
        arrivals.push(at);
        events.push(data.to_string());
    });
    assert_eq!(status, 200);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let first_content = events
        .iter()
        .position(|e| e.contains("tok0"))
        .expect("a content chunk");
    let done = *arrivals.last().unwrap();
    assert!(
        arrivals[first_content] + Duration::from_millis(1000) < done,
        "first token at {:?} but stream ended at {done:?}: the gateway buffered the stream",
        arrivals[first_content]
    );
    let chunk: serde_json::Value = serde_json::from_str(&events[first_content]).unwrap();
    assert_eq!(chunk["object"], "chat.completion.chunk");
}

#[test]
fn answers_openai_shaped_errors_with_the_documented_codes() {
    let (mock, gw) = setup();
    let auth = format!("Bearer {TENANT_KEY}");
    let with_key: &[(&str, &str)] = &[("authorization", &auth)];
    // (what, request headers, body, expected status, expected error code)
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a [u8], u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            "no key",
            &[],
            br#"{"model":"gpt-4o-mini"}"#,
            401,
            "invalid_api_key",
        ),
        (
            "unknown key",
            &[("authorization", "Bearer sk-nope-nope")],
            br#"{"model":"gpt-4o-mini"}"#,
            401,
            "invalid_api_key",
        ),
        (
            "basic auth",
            &[("authorization", "Basic abc")],
            br#"{"model":"gpt-4o-mini"}"#,
            401,
            "invalid_api_key",
        ),
        (
            "malformed json",
            with_key,
            b"{\"model\": ",
            400,
            "invalid_json",
        ),
        ("not json", with_key, b"hello", 400, "invalid_json"),
        (
            "invalid utf-8",
            with_key,
            b"{\"model\": \"gpt\xff\"}",
            400,
            "invalid_json",
        ),
        (
            "missing model",
            with_key,
            br#"{"messages":[]}"#,
            400,
            "missing_model",
        ),
        (
            "empty model",
            with_key,
            br#"{"model":""}"#,
            400,
            "missing_model",
        ),
        (
            "model not a string",
            with_key,
            br#"{"model":42}"#,
            400,
            "invalid_value",
        ),
        (
            "stream not a bool",
            with_key,
            br#"{"model":"gpt-4o-mini","stream":"yes"}"#,
            400,
            "invalid_value",
        ),
        (
            "array body",
            with_key,
            br#"[{"model":"gpt-4o-mini"}]"#,
            400,
            "invalid_request",
        ),
        (
            "unknown model",
            with_key,
            br#"{"model":"gpt-9"}"#,
            404,
            "model_not_found",
        ),
    ];
    for (name, headers, body, status, code) in cases {
        let resp = gw.post_raw("/v1/chat/completions", headers, body);
        assert_eq!(
            resp.status,
            status,
            "{name}: {}",
            String::from_utf8_lossy(&resp.body)
        );
        assert_eq!(resp.error_code(), code, "{name}");
        assert!(
            resp.header("x-request-id").is_some(),
            "{name}: x-request-id"
        );
    }
    let resp = gw.post_json(
        "/v1/chat/completions",
        RESTRICTED_KEY,
        &chat("gpt-4o-mini", false),
    );
    assert_eq!(
        (resp.status, resp.error_code()),
        (403, "model_not_allowed".to_string())
    );
    assert_eq!(resp.json()["error"]["type"], "permission_error");

    let resp = gw.post_raw("/v1/nothing-here", with_key, b"{}");
    assert_eq!(
        (resp.status, resp.error_code()),
        (404, "unknown_url".to_string())
    );
    let resp = gw.get("/v1/chat/completions", Some(TENANT_KEY));
    assert_eq!(
        (resp.status, resp.error_code()),
        (405, "method_not_allowed".to_string())
    );
    assert_eq!(resp.header("allow"), Some("POST"));
    // `Allow` names the path's own methods.
    let auth = format!("Bearer {TENANT_KEY}");
    for (method, path, allow) in [
        ("POST", "/v1/models", "GET, HEAD"),
        ("DELETE", "/v1/usage", "GET, HEAD"),
        ("POST", "/v1/models/gpt-4o-mini", "GET, HEAD"),
        ("POST", "/v1/jobs", "GET, HEAD"),
        ("PUT", "/v1/jobs/job_0123456789abcdef", "GET, HEAD, DELETE"),
        ("PUT", "/v1/responses/resp_1", "GET, DELETE"),
        ("GET", "/v1/responses/resp_1/cancel", "POST"),
    ] {
        let resp = call(method, &gw.url(path), &[("authorization", &auth)], None);
        assert_eq!(resp.status, 405, "{method} {path}");
        assert_eq!(resp.header("allow"), Some(allow), "{method} {path}");
    }
    // HEAD where GET works: the head alone, with GET's status.
    for (path, status) in [
        ("/v1/models", 200),
        ("/v1/jobs", 200),
        ("/v1/jobs/job_0123456789abcdef", 404),
    ] {
        let resp = call("HEAD", &gw.url(path), &[("authorization", &auth)], None);
        let get = call("GET", &gw.url(path), &[("authorization", &auth)], None);
        assert_eq!((resp.status, get.status), (status, status), "{path}");
        assert!(resp.body.is_empty(), "{path}");
    }

    assert_eq!(
        mock.request_count(),
        0,
        "no refused request reached the provider"
    );
    let resp = gw.post_json(
        "/v1/chat/completions",
        TENANT_KEY,
        &chat("gpt-4o-mini", false),
    );
    assert_eq!(resp.status, 200, "still serving after bad input");
}

#[test]
fn refuses_both_content_length_and_transfer_encoding() {
    let (mock, gw) = setup();
    let body = r#"{"model":"gpt-4o-mini"}"#;
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TENANT_KEY}\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len(),
        body.len()
    );
    let answer = raw_exchange(gw.port, request.as_bytes(), Duration::from_secs(5));
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(mock.request_count(), 0);
}

#[test]
fn keeps_a_sane_client_request_id_and_replaces_others() {
    let (mock, gw) = setup();
    let body = chat("gpt-4o-mini", false).to_string();
    let auth = format!("Bearer {TENANT_KEY}");
    let resp = gw.post_raw(
        "/v1/chat/completions",
        &[("authorization", &auth), ("x-request-id", "trace-42.a")],
        body.as_bytes(),
    );
    assert_eq!(resp.header("x-request-id"), Some("trace-42.a"));
    let upstream = mock.requests()[0]["headers"]["x-request-id"].clone();
    assert!(
        is_uuid(upstream.as_str().unwrap()),
        "upstream gets a UUID made from it: {upstream}"
    );
    let uuid = "0f0e0d0c-0b0a-4908-8706-050403020100";
    gw.post_raw(
        "/v1/chat/completions",
        &[("authorization", &auth), ("x-request-id", uuid)],
        body.as_bytes(),
    );
    assert_eq!(
        mock.requests()[1]["headers"]["x-request-id"],
        uuid,
        "a client's UUID goes upstream as it is"
    );
    let resp = gw.post_raw(
        "/v1/chat/completions",
        &[
            ("authorization", &auth),
            ("x-request-id", "bad id <script>"),
        ],
        body.as_bytes(),
    );
    assert!(is_uuid(resp.header("x-request-id").unwrap()));
}

#[test]
fn strips_hop_by_hop_headers_and_cookies_both_ways() {
    let (mock, gw) = setup();
    mock.fault(json!({"headers": {"set-cookie": "session=provider", "x-ratelimit-remaining-requests": "1"}, "count": 1}));
    let body = chat("gpt-4o-mini", false).to_string();
    let auth = format!("Bearer {TENANT_KEY}");
    let resp = gw.post_raw(
        "/v1/chat/completions",
        &[
            ("authorization", &auth),
            ("connection", "keep-alive, x-private"),
            ("x-private", "secret"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("te", "trailers"),
            ("cookie", "tenant=1"),
            ("user-agent", "OpenAI/Python test"),
        ],
        body.as_bytes(),
    );
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.header("set-cookie"),
        None,
        "provider cookies are not forwarded"
    );
    assert_eq!(
        resp.header("x-ratelimit-remaining-requests"),
        None,
        "provider account limits are not forwarded"
    );
    let seen = &mock.requests()[0]["headers"];
    for name in [
        "x-private",
        "proxy-authorization",
        "te",
        "cookie",
        "x-api-key",
    ] {
        assert!(
            seen.get(name).is_none(),
            "{name} reached the provider: {seen}"
        );
    }
    assert_ne!(seen["connection"], "keep-alive, x-private");
    assert_eq!(seen["user-agent"], "OpenAI/Python test");
}

#[test]
fn never_honours_body_fields_that_name_another_upstream() {
    let (mock, gw) = setup();
    let mut body = chat("gpt-4o-mini", false);
    body["api_base"] = json!("http://127.0.0.1:1/v1");
    body["base_url"] = json!("http://127.0.0.1:1/v1");
    body["api_key"] = json!("sk-from-body");
    let resp = gw.post_json("/v1/chat/completions", TENANT_KEY, &body);
    assert_eq!(resp.status, 200);
    assert_eq!(mock.request_count(), 1, "served by the configured provider");
    assert_eq!(mock.requests()[0]["model"], "mock-small");
}

#[test]
fn provider_refusing_the_gateway_key_is_a_502_not_the_tenants_401() {
    let mock = Mock::start(&["--api-key", "a-different-provider-key"]);
    let gw = Gateway::start(&GatewayConfig::new(&mock));
    let resp = gw.post_json(
        "/v1/chat/completions",
        TENANT_KEY,
        &chat("gpt-4o-mini", false),
    );
    assert_eq!(
        (resp.status, resp.error_code()),
        (502, "upstream_error".to_string())
    );
}

#[test]
fn routes_around_a_dead_target() {
    let mock = Mock::start(&[]);
    let mut config = GatewayConfig::new(&mock);
    let dead = free_port();
    config.providers.push(format!(
        "  - {{ name: dead, base_url: \"http://127.0.0.1:{dead}/v1\" }}"
    ));
    config.models = "
  - name: gpt-4o-mini
    targets: [{ provider: dead }, { provider: mock }]
"
    .into();
    config.tenants = format!("\n  - id: acme\n    keys: [\"{TENANT_KEY}\"]\n");
    let gw = Gateway::start(&config);
    for _ in 0..6 {
        let resp = gw.post_json(
            "/v1/chat/completions",
            TENANT_KEY,
            &chat("gpt-4o-mini", false),
        );
        assert_eq!(resp.status, 200);
        assert_eq!(resp.header("x-runestone-provider"), Some("mock"));
    }
    assert_eq!(mock.request_count(), 6);
}

#[test]
fn unreachable_provider_is_a_502() {
    let mock = Mock::start(&[]);
    let mut config = GatewayConfig::new(&mock);
    let port = free_port();
    config.providers = vec![format!(
        "  - {{ name: mock, base_url: \"http://127.0.0.1:{port}/v1\" }}"
    )];
    let gw = Gateway::start(&config);
    let resp = gw.post_json(
        "/v1/chat/completions",
        TENANT_KEY,
        &chat("gpt-4o-mini", false),
    );
    assert_eq!(
        (resp.status, resp.error_code()),
        (502, "upstream_error".to_string())
    );
    // The provider by name; its address is the operator's (in the log),
    // not the tenant's.
    let message = resp.json()["error"]["message"].to_string();
    assert!(message.contains("'mock'"), "{message}");
    assert!(!message.contains(&port.to_string()), "{message}");
    assert!(gw.log().contains(&format!("127.0.0.1:{port}")));
}

#[test]
fn answers_health_ready_models_and_metrics() {
    let (_mock, gw) = setup();
    let health = gw.get("/health", None);
    assert_eq!(
        (health.status, health.json()["status"].as_str()),
        (200, Some("ok"))
    );
    let ready = gw.get("/ready", None);
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json()["checks"]["models"]["gpt-4o-mini"], "ok");

    let models = gw.get("/v1/models", Some(TENANT_KEY)).json();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(models["object"], "list");
    assert_eq!(ids, ["gpt-4o-mini", "same-name", "text-embedding-3-small"]);
    let restricted = gw.get("/v1/models", Some(RESTRICTED_KEY)).json();
    assert_eq!(restricted["data"].as_array().unwrap().len(), 1);
    assert_eq!(gw.get("/v1/models", None).status, 401);

    gw.post_json(
        "/v1/chat/completions",
        TENANT_KEY,
        &chat("gpt-4o-mini", false),
    );
    gw.post_json(
        "/v1/chat/completions",
        "sk-wrong-key-xyz",
        &chat("gpt-4o-mini", false),
    );
    // Request metrics are recorded as the request is logged, just after
    // the client has its answer (each request on its own connection: in
    // either order).
    wait_until(Duration::from_secs(5), "both requests to be logged", || {
        let metrics = gw.metrics();
        metrics.contains(r#"runestone_errors_total{reason="auth"} 2"#)
            && metrics.contains(r#"runestone_request_duration_seconds_count{model="gpt-4o-mini",provider="mock"} 1"#)
    });
    let metrics = gw.metrics();
    assert!(
        metrics.contains(r#"runestone_requests_total{model="gpt-4o-mini",provider="mock",status="200",tenant="acme"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains(
        r#"runestone_request_duration_seconds_count{model="gpt-4o-mini",provider="mock"} 1"#
    ));
    assert!(
        metrics.contains(r#"runestone_errors_total{reason="auth"} 2"#),
        "{metrics}"
    );
    assert!(!metrics.contains("sk-wrong-key-xyz"));
}

#[test]
fn never_logs_keys() {
    let mock = Mock::start(&["--api-key", PROVIDER_KEY]);
    let config = GatewayConfig::new(&mock);
    let gw = Gateway::start_with_env(&config, &[("RUST_LOG", "trace")]);
    gw.post_json(
        "/v1/chat/completions",
        TENANT_KEY,
        &chat("gpt-4o-mini", false),
    );
    gw.post_json(
        "/v1/chat/completions",
        TENANT_KEY,
        &chat("gpt-4o-mini", true),
    );
    gw.post_json(
        "/v1/chat/completions",
        "sk-unknown-key-1234",
        &chat("gpt-4o-mini", false),
    );
    gw.post_json(
        "/v1/chat/completions",
        RESTRICTED_KEY,
        &chat("gpt-4o-mini", false),
    );
    mock.fault(json!({"status": 500, "count": 1}));
    gw.post_json(
        "/v1/chat/completions",
        TENANT_KEY,
        &chat("gpt-4o-mini", false),
    );
    // A provider echoing its key in its headers and body: Pingora's own
    // debug events print whole response headers (and, on a malformed
    // chunk, the body read).
    for stream in [false, true] {
        mock.fault(json!({"echo_key": true, "count": 1}));
        gw.post_json(
            "/v1/chat/completions",
            TENANT_KEY,
            &chat("gpt-4o-mini", stream),
        );
    }
    let log = gw.log();
    assert!(log.len() > 100, "the gateway logged at trace level: {log}");
    for key in [
        TENANT_KEY,
        RESTRICTED_KEY,
        PROVIDER_KEY,
        "sk-unknown-key-1234",
    ] {
        assert!(!log.contains(key), "key {key} appears in the log");
    }
    assert!(!gw.metrics().contains(TENANT_KEY));
}

#[test]
fn check_lists_every_problem_with_its_path_and_exits_2() {
    let dir = std::env::temp_dir().join(format!("runestone-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        r#"
server: { listen: "127.0.0.1:1", extra: 1 }
providers:
  - { name: p, base_url: "ftp://x", api_key: "${RUNESTONE_TEST_UNSET_VAR}" }
models:
  - { name: m, targets: [{ provider: ghost }] }
tenants:
  - { id: t, keys: ["sha256:00"] }
"#,
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_runestone"))
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "server.extra: unknown field `extra`",
        "providers[0].base_url: scheme 'ftp' is not supported",
        "providers[0].api_key: environment variable RUNESTONE_TEST_UNSET_VAR is not set",
        "models[0].targets[0].provider: unknown provider 'ghost'",
        "tenants[0].keys[0]: a 'sha256:' key must be followed by 64 hex digits",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
    let good = Command::new(env!("CARGO_BIN_EXE_runestone"))
        .args([
            "check",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/conf/demo.yaml"),
        ])
        .output()
        .unwrap();
    assert_eq!(
        good.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    let missing = Command::new(env!("CARGO_BIN_EXE_runestone"))
        .args(["check", "--config", "/nonexistent/runestone.yaml"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn hash_key_prints_the_sha256_digest() {
    assert_eq!(
        sha256_key("test"),
        "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    );
}

#[test]
fn writes_one_access_log_line_per_request_with_allow_listed_fields() {
    let (_mock, gw) = setup();
    let body = chat("gpt-4o-mini", false).to_string();
    let resp = gw.post_raw(
        "/v1/chat/completions",
        &[
            ("authorization", &format!("Bearer {TENANT_KEY}")),
            ("x-request-id", "access-1"),
        ],
        body.as_bytes(),
    );
    assert_eq!(resp.status, 200);
    gw.post_raw("/v1/secret-path-sk-in-url", &[], b"{}");
    // Each request is logged just after its answer, on its own connection:
    // in either order.
    wait_until(Duration::from_secs(5), "the access log lines", || {
        let log = gw.log();
        let access = || log.lines().filter(|l| l.contains("\"type\":\"access\""));
        access().any(|l| l.contains("\"status\":404"))
            && access().any(|l| l.contains("\"request_id\":\"access-1\""))
    });
    let lines: Vec<serde_json::Value> = gw
        .log()
        .lines()
        .filter(|l| l.contains("\"type\":\"access\""))
        .map(|l| serde_json::from_str(l).expect("each access line is JSON"))
        .collect();
    let line = lines
        .iter()
        .find(|l| l["request_id"] == "access-1")
        .expect("the request's line");
    assert_eq!(line["tenant"], "acme");
    assert_eq!(line["endpoint"], "chat");
    assert_eq!(line["model"], "gpt-4o-mini");
    assert_eq!(line["provider"], "mock");
    assert_eq!(line["status"], 200);
    assert_eq!(line["attempts"], 1);
    assert!(line["prompt_tokens"].as_u64().unwrap() > 0);
    assert!(line["completion_tokens"].as_u64().unwrap() > 0);
    assert!(line["duration"].as_f64().unwrap() > 0.0);
    assert!(line["ttft"].as_f64().is_some());
    let unknown = lines
        .iter()
        .find(|l| l["status"] == 404)
        .unwrap_or_else(|| panic!("the 404's line: {lines:?}"));
    assert_eq!(unknown["endpoint"], "other");
    assert!(
        !gw.log().contains("secret-path"),
        "client-chosen paths are not logged"
    );
    let metrics = gw.metrics();
    assert!(metrics.contains(
        "runestone_time_to_first_token_seconds_count{model=\"gpt-4o-mini\",provider=\"mock\"} 1"
    ));
    assert!(metrics.contains("runestone_gateway_overhead_seconds_count 1"));
}

#[test]
fn the_access_log_writer_sleeps_while_idle_and_wakes_for_the_next_line() {
    let (_mock, gw) = setup();
    let logged = |id: &str| {
        let needle = format!("\"request_id\":\"{id}\"");
        wait_until(
            Duration::from_secs(5),
            "the request's access log line",
            || gw.log().contains(&needle),
        );
    };
    let send = |id: &str| {
        let body = chat("gpt-4o-mini", false).to_string();
        let resp = gw.post_raw(
            "/v1/chat/completions",
            &[
                ("authorization", &format!("Bearer {TENANT_KEY}")),
                ("x-request-id", id),
            ],
            body.as_bytes(),
        );
        assert_eq!(resp.status, 200);
    };
    send("idle-1");
    logged("idle-1");
    // The writer's wake-ups (it wrote every 5 ms, idle or not: 60 in
    // such a window): none in 300 ms once it sleeps.
    let writer = std::fs::read_dir(format!("/proc/{}/task", gw.pid()))
        .expect("the gateway's threads")
        .filter_map(Result::ok)
        .map(|task| task.path())
        .find(|task| {
            std::fs::read_to_string(task.join("comm")).is_ok_and(|name| name.trim() == "access-log")
        })
        .expect("the access-log thread");
    let wakeups = || {
        let status = std::fs::read_to_string(writer.join("status")).unwrap();
        let line = status
            .lines()
            .find(|l| l.starts_with("voluntary_ctxt_switches:"))
            .expect("the thread's context switches");
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    wait_until(
        Duration::from_secs(5),
        "the access log writer to sleep",
        || {
            let before = wakeups();
            std::thread::sleep(Duration::from_millis(300));
            wakeups() == before
        },
    );
    send("idle-2");
    logged("idle-2");
}

#[test]
fn serves_https_with_the_configured_certificate() {
    let dir = std::env::temp_dir().join(format!("runestone-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
        ])
        .args([
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl (scripts/setup.sh installs it)");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let mock = Mock::start(&[]);
    let mut config = GatewayConfig::new(&mock);
    config.tls = Some((cert.display().to_string(), key.display().to_string()));
    let gw = Gateway::start_tls(&config);
    let body = chat("gpt-4o-mini", false).to_string();
    let out = Command::new("curl")
        .args(["-sS", "--fail-with-body", "--cacert"])
        .arg(&cert)
        .args([
            "-H",
            &format!("authorization: Bearer {TENANT_KEY}"),
            "-H",
            "content-type: application/json",
        ])
        .args([
            "-d",
            &body,
            &format!("https://localhost:{}/v1/chat/completions", gw.port),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["object"], "chat.completion");
    let plain = Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            &format!("http://127.0.0.1:{}/health", gw.port),
        ])
        .output()
        .unwrap();
    assert!(
        !plain.status.success(),
        "the API listener speaks only HTTPS"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn never_forwards_a_provider_key_the_provider_echoes() {
    let (mock, gw) = setup();
    mock.fault(json!({
        "status": 400,
        "error_body": format!("{{\"error\":{{\"message\":\"Incorrect API key provided: {PROVIDER_KEY}\",\"type\":\"invalid_request_error\"}}}}"),
        "path": "/v1/chat/completions",
    }));
    let resp = gw.post_json(
        "/v1/chat/completions",
        TENANT_KEY,
        &chat("gpt-4o-mini", false),
    );
    assert_eq!(resp.status, 400);
    let body = String::from_utf8_lossy(&resp.body).to_string();
    assert!(!body.contains(PROVIDER_KEY), "{body}");
    assert!(body.contains("Incorrect API key provided: *****"), "{body}");
}

#[test]
fn throttles_failed_authentication_per_client_address() {
    let mock = Mock::start(&[]);
    let mut config = GatewayConfig::new(&mock);
    config.server_extra = "  auth_failures_per_minute: 3\n".into();
    let gw = Gateway::start(&config);
    for _ in 0..3 {
        let resp = gw.post_json(
            "/v1/chat/completions",
            "sk-guess-guess-guess",
            &chat("gpt-4o-mini", false),
        );
        assert_eq!(resp.status, 401);
    }
    let resp = gw.post_json(
        "/v1/chat/completions",
        "sk-guess-guess-guess",
        &chat("gpt-4o-mini", false),
    );
    assert_eq!(
        (resp.status, resp.error_code()),
        (429, "rate_limit_exceeded".to_string())
    );
    let ms: u64 = resp.header("retry-after-ms").unwrap().parse().unwrap();
    assert!((1..=20_000).contains(&ms), "{ms}");
    // A valid key from the same address is never throttled by others'
    // failures (behind a load balancer every client shares one address).
    let resp = gw.post_json(
        "/v1/chat/completions",
        TENANT_KEY,
        &chat("gpt-4o-mini", false),
    );
    assert_eq!(resp.status, 200);
    assert_eq!(mock.request_count(), 1);
}
