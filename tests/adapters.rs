//! Provider adapters through real processes: an Azure OpenAI-kind provider
//! behind the same OpenAI surface.

mod common;

use common::*;
use serde_json::json;

fn azure(mock: &Mock) -> GatewayConfig {
    let mut config = GatewayConfig::new(mock);
    config.providers = vec![format!(
        "  - {{ name: azure, kind: azure, base_url: \"http://127.0.0.1:{}\", api_key: \"{PROVIDER_KEY}\", api_version: \"2024-10-21\" }}",
        mock.port
    )];
    config.models = "
  - name: gpt-4o-mini
    targets: [{ provider: azure, model: my-4o-mini }]
  - name: text-embedding-3-small
    targets: [{ provider: azure, model: my-embeddings }]
"
    .into();
    config
}

#[test]
fn azure_chat_uses_deployment_urls_and_the_api_key_header() {
    let mock = Mock::start(&["--api-key", PROVIDER_KEY]);
    let gw = Gateway::start(&azure(&mock));
    let resp = gw.post_json(
        "/v1/chat/completions",
        TENANT_KEY,
        &chat("gpt-4o-mini", false),
    );
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    assert_eq!(resp.json()["object"], "chat.completion");
    let seen = &mock.requests()[0];
    assert_eq!(
        seen["path"],
        "/openai/deployments/my-4o-mini/chat/completions"
    );
    assert_eq!(seen["query"], "api-version=2024-10-21");
    assert_eq!(seen["headers"]["api-key"], PROVIDER_KEY);
    assert!(
        seen["headers"].get("authorization").is_none(),
        "{}",
        seen["headers"]
    );
}

#[test]
fn azure_streams_and_embeddings_work_with_accounting() {
    let mock = Mock::start(&["--api-key", PROVIDER_KEY]);
    let gw = Gateway::start(&azure(&mock));
    let events = sse(&gw, &chat("gpt-4o-mini", true));
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert!(
        events.iter().all(|e| !e.contains("\"usage\"")),
        "the usage the gateway asked for is removed"
    );
    let resp = gw.post_json(
        "/v1/embeddings",
        TENANT_KEY,
        &json!({"model": "text-embedding-3-small", "input": "hello"}),
    );
    assert_eq!(resp.status, 200);
    assert_eq!(
        mock.requests()[1]["path"],
        "/openai/deployments/my-embeddings/embeddings"
    );
    let tokens = metric_value(
        &gw.metrics(),
        r#"runestone_tokens_total{kind="completion",model="gpt-4o-mini",tenant="acme"}"#,
    );
    assert_eq!(tokens, mock.stats()["completion_tokens"].as_f64().unwrap());
}

#[test]
fn an_azure_provider_needs_an_api_version() {
    let dir = std::env::temp_dir().join(format!("runestone-azure-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.yaml");
    std::fs::write(
        &path,
        "server: { listen: \"127.0.0.1:1\" }\nproviders:\n  - { name: a, kind: azure, base_url: \"https://x.openai.azure.com\" }\n  - { name: b, base_url: \"https://api.openai.com/v1\", api_version: \"2024-10-21\" }\nmodels:\n  - { name: m, targets: [{ provider: a }] }\ntenants: []\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_runestone"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("providers[0].api_version: an azure provider needs api_version"),
        "{stderr}"
    );
    assert!(
        stderr.contains("providers[1].api_version: only azure providers take api_version"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A gateway whose `claude` model is served by the mock's Anthropic
/// Messages endpoint, and whose `mixed` model fails over from an OpenAI
/// target to it.
fn anthropic(mock: &Mock) -> GatewayConfig {
    let mut config = GatewayConfig::new(mock);
    config.providers = vec![
        format!(
            "  - {{ name: claude, kind: anthropic, base_url: \"http://127.0.0.1:{}\", api_key: \"{PROVIDER_KEY}\" }}",
            mock.port
        ),
        format!("  - {{ name: openai, base_url: \"{}\", api_key: \"{PROVIDER_KEY}\" }}", mock.base_url()),
    ];
    config.models = "
  - name: claude
    targets: [{ provider: claude, model: claude-test }]
  - name: mixed
    strategy: priority
    targets: [{ provider: openai, model: gpt-test }, { provider: claude, model: claude-test }]
"
    .into();
    config.extra = "pricing:\n  claude: { input: 3, output: 15 }\n".into();
    config.tenants = format!("\n  - id: acme\n    keys: [\"{TENANT_KEY}\"]\n");
    config
}

fn sse(gw: &Gateway, body: &serde_json::Value) -> Vec<String> {
    let (status, events) = sse_events(gw.port, "/v1/chat/completions", TENANT_KEY, body);
    assert_eq!(status, 200);
    events
}

#[test]
fn anthropic_chat_is_translated_both_ways() {
    let mock = Mock::start(&["--api-key", PROVIDER_KEY]);
    let gw = Gateway::start(&anthropic(&mock));
    let mut body = chat("claude", false);
    body["messages"] =
        json!([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]);
    body["max_tokens"] = json!(5);
    let resp = gw.post_json("/v1/chat/completions", TENANT_KEY, &body);
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let answer = resp.json();
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["model"], "claude");
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        "tok0 tok1 tok2 tok3 tok4"
    );
    assert_eq!(answer["choices"][0]["finish_reason"], "length");
    assert_eq!(answer["usage"]["completion_tokens"], 5);
    let seen = &mock.requests()[0];
    assert_eq!(seen["path"], "/v1/messages");
    assert_eq!(seen["model"], "claude-test");
    assert_eq!(seen["headers"]["x-api-key"], PROVIDER_KEY);
    assert_eq!(seen["headers"]["anthropic-version"], "2023-06-01");
    assert!(seen["headers"].get("authorization").is_none());
    let usage = gw.get("/v1/usage", Some(TENANT_KEY)).json();
    assert_eq!(usage["prompt_tokens"], mock.stats()["prompt_tokens"]);
    assert_eq!(
        usage["completion_tokens"],
        mock.stats()["completion_tokens"]
    );
}

#[test]
fn anthropic_streams_are_translated_with_and_without_usage() {
    let mock = Mock::start(&["--api-key", PROVIDER_KEY]);
    let gw = Gateway::start(&anthropic(&mock));
    let mut body = chat("claude", true);
    body["max_tokens"] = json!(6);
    let events = sse(&gw, &body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<serde_json::Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(
        chunks.iter().all(|c| c.get("usage").is_none()),
        "no usage unless asked"
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "tok0 tok1 tok2 tok3 tok4 tok5 ");
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );

    body["stream_options"] = json!({"include_usage": true});
    let events = sse(&gw, &body);
    let last: serde_json::Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"], 6);
    let usage = gw.get("/v1/usage", Some(TENANT_KEY)).json();
    assert_eq!(
        usage["completion_tokens"],
        mock.stats()["completion_tokens"]
    );
    assert_eq!(usage["prompt_tokens"], mock.stats()["prompt_tokens"]);
}

#[test]
fn an_anthropic_stream_without_usage_tells_the_client_what_it_is_billed() {
    let mock = Mock::start(&["--api-key", PROVIDER_KEY]);
    let gw = Gateway::start(&anthropic(&mock));
    let mut body = chat("claude", true);
    body["max_tokens"] = json!(6);
    body["stream_options"] = json!({"include_usage": true});
    // The provider keeps the body open after `message_stop`: no report can
    // follow it, so the request is settled before the client's `[DONE]`.
    mock.fault(json!({"no_usage": true, "linger_ms": 3000}));
    let (mut events, mut at_done) = (Vec::new(), None);
    let status = read_sse_at(
        gw.port,
        "/v1/chat/completions",
        TENANT_KEY,
        &body,
        |data, _| {
            if data == "[DONE]" {
                at_done = Some(gw.get("/v1/usage", Some(TENANT_KEY)).json());
            }
            events.push(data.to_string());
        },
    );
    assert_eq!(status, 200);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let last: serde_json::Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(last["choices"], json!([]));
    // The gateway counted (the mock said nothing): the prompt, and the
    // text up to the request's limit.
    let (prompt, completion) = (
        last["usage"]["prompt_tokens"].as_u64().unwrap(),
        last["usage"]["completion_tokens"].as_u64().unwrap(),
    );
    assert!(prompt > 0 && completion > 0, "{last}");
    // Billed by the time the client had `[DONE]`.
    let usage = at_done.unwrap();
    assert_eq!(usage["requests"], 1, "settled before the client's [DONE]");
    assert_eq!(usage["prompt_tokens"], prompt, "the chunk is the bill");
    assert_eq!(usage["completion_tokens"], completion);
    assert_eq!(last["usage"]["total_tokens"], prompt + completion);

    // No limit asked: the gateway sent Anthropic its default of 4096 (the
    // mock stops there, its text far more than 4096 tokens), and the count
    // is capped at it.
    body.as_object_mut().unwrap().remove("max_tokens");
    body["mock_tokens"] = json!(5000);
    mock.fault(json!({"no_usage": true}));
    let events = sse(&gw, &body);
    let last: serde_json::Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(last["usage"]["completion_tokens"], 4096, "{last}");
    let usage = gw.get("/v1/usage", Some(TENANT_KEY)).json();
    assert_eq!(usage["completion_tokens"], completion + 4096);
}

#[test]
fn an_anthropic_stream_that_stalls_after_message_stop_ends_cleanly() {
    // `message_stop` is the translated stream's last event: a body held
    // open after it is whole, not a break.
    let mock = Mock::start(&["--api-key", PROVIDER_KEY]);
    let mut config = anthropic(&mock);
    config.providers[0] = config.providers[0].replace(" }", ", timeouts: { idle_ms: 300 } }");
    let gw = Gateway::start(&config);
    mock.fault(json!({"linger_ms": 10000}));
    let events = sse(&gw, &chat("claude", true));
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    assert!(!events.iter().any(|e| e.contains("error")), "{events:?}");
    assert!(!gw.metrics().contains("provider_stream_broken"));
}

#[test]
fn an_anthropic_stream_cut_short_ends_with_an_error_event() {
    // As an OpenAI stream does: an in-band error event and a clean end,
    // no `[DONE]`, rather than a connection cut mid-body.
    let mock = Mock::start(&["--api-key", PROVIDER_KEY]);
    let mut config = anthropic(&mock);
    config.models = "\n  - name: claude\n    resume_streams: false\n    targets: [{ provider: claude, model: claude-test }]\n".into();
    let gw = Gateway::start(&config);
    // Broken off, and ended cleanly before `message_stop`.
    for fault in [
        json!({"disconnect_after_chunks": 2}),
        json!({"end_after_chunks": 2}),
    ] {
        mock.fault(fault.clone());
        let events = sse(&gw, &chat("claude", true));
        let last: serde_json::Value = serde_json::from_str(events.last().unwrap()).unwrap();
        assert_eq!(
            last["error"]["code"], "upstream_error",
            "{fault}: {events:?}"
        );
        assert!(!events.iter().any(|e| e == "[DONE]"), "{fault}: {events:?}");
    }
}

#[test]
fn anthropic_tool_calls_come_back_as_openai_tool_calls() {
    let mock = Mock::start(&["--api-key", PROVIDER_KEY]);
    let gw = Gateway::start(&anthropic(&mock));
    let mut body = chat("claude", false);
    body["tools"] = json!([{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]);
    body["tool_choice"] = json!("required");
    let answer = gw
        .post_json("/v1/chat/completions", TENANT_KEY, &body)
        .json();
    let call = &answer["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "lookup");
    assert_eq!(call["function"]["arguments"], "{\"mock\":true}");
    assert_eq!(answer["choices"][0]["finish_reason"], "tool_calls");
}

#[test]
fn anthropic_errors_map_to_openai_errors() {
    let mock = Mock::start(&["--api-key", PROVIDER_KEY]);
    let gw = Gateway::start(&anthropic(&mock));
    for (status, expected_status, code) in [
        (400, 400, "invalid_request"),
        (404, 404, "model_not_found"),
        (500, 502, "upstream_error"),
        (529, 502, "upstream_error"),
        // Last: a provider 429 also cools the backend down.
        (429, 429, "upstream_rate_limited"),
    ] {
        // Twice: a 5xx may be tried once more on the same deployment. A
        // 429's wait is longer than the gateway waits for.
        let fault = match status {
            429 => json!({"status": 429, "retry_after": 30, "path": "/v1/messages"}),
            500.. => json!({"status": status, "count": 2, "path": "/v1/messages"}),
            _ => json!({"status": status, "path": "/v1/messages"}),
        };
        mock.fault(fault);
        let resp = gw.post_json("/v1/chat/completions", TENANT_KEY, &chat("claude", false));
        assert_eq!(
            (resp.status, resp.error_code()),
            (expected_status, code.to_string()),
            "provider {status}"
        );
    }
}

#[test]
fn fails_over_from_an_openai_target_to_an_anthropic_one() {
    let mock = Mock::start(&["--api-key", PROVIDER_KEY]);
    let gw = Gateway::start(&anthropic(&mock));
    // Twice: once more on the same deployment, then the fallback target.
    mock.fault(json!({"status": 503, "count": 2, "path": "/v1/chat/completions"}));
    let resp = gw.post_json("/v1/chat/completions", TENANT_KEY, &chat("mixed", false));
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("x-runestone-provider"), Some("claude"));
    assert_eq!(resp.header("x-runestone-attempts"), Some("3"));
    assert_eq!(resp.json()["object"], "chat.completion");
}

#[test]
fn refused_attempts_give_their_connection_back_to_the_pool() {
    // A 503 retried on the same deployment, then a 429: each refusal's
    // body is read out and its connection reused, where each used to be
    // closed, so every retry under load dialled anew (a TLS handshake,
    // for real).
    let mock = Mock::start(&["--api-key", PROVIDER_KEY]);
    let gw = Gateway::start(&anthropic(&mock));
    let resp = gw.post_json("/v1/chat/completions", TENANT_KEY, &chat("mixed", false));
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    mock.fault(json!({"status": 503, "count": 2, "path": "/v1/chat/completions"}));
    let resp = gw.post_json("/v1/chat/completions", TENANT_KEY, &chat("mixed", false));
    assert_eq!(resp.header("x-runestone-attempts"), Some("3"));
    mock.fault(json!({"status": 429, "count": 1, "path": "/v1/chat/completions"}));
    let resp = gw.post_json("/v1/chat/completions", TENANT_KEY, &chat("mixed", false));
    assert_eq!(resp.header("x-runestone-attempts"), Some("2"));
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let stats = mock.stats();
    assert_eq!(stats["requests"], 6, "{stats}");
    assert_eq!(stats["connections"], 1, "one connection for all: {stats}");
}

#[test]
fn answers_read_whole_give_their_connection_back_to_the_pool() {
    // Error answers passed on to the client and translated JSON answers are
    // read whole before anything is sent: each used to close its pooled
    // connection, so the next request dialled (a TLS handshake, for real).
    let mock = Mock::start(&["--api-key", PROVIDER_KEY]);
    let gw = Gateway::start(&anthropic(&mock));
    let mut body = chat("claude", false);
    body["max_tokens"] = json!(5);
    for _ in 0..5 {
        let resp = gw.post_json("/v1/chat/completions", TENANT_KEY, &body);
        assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    }
    mock.fault(json!({"status": 400, "count": 5}));
    for _ in 0..5 {
        let resp = gw.post_json("/v1/chat/completions", TENANT_KEY, &chat("mixed", false));
        assert_eq!(resp.status, 400, "{}", String::from_utf8_lossy(&resp.body));
    }
    let stats = mock.stats();
    assert_eq!(stats["requests"], 10, "{stats}");
    assert_eq!(
        stats["connections"], 1,
        "one connection for all ten: {stats}"
    );
}

#[test]
fn kept_connections_are_reused_when_requests_move_between_threads() {
    // Two threads and Redis: a request waits on Redis's answer and may go
    // on on the other thread than the one that kept the connection.
    // Pingora's connector then lost a kept connection for about one
    // request in three (closed it, dialled anew, logged "failed to acquire
    // reusable stream" at ERROR): 4 to 28 connections for these 30.
    let mock = Mock::start(&[]);
    let redis = Redis::start();
    let mut config = GatewayConfig::new(&mock);
    config.tenants = format!(
        "\n  - id: acme\n    keys: [\"{TENANT_KEY}\"]\n    limits: {{ requests_per_minute: 100000 }}\n"
    );
    config.extra = redis.section();
    let gw = Gateway::start(&config);
    for _ in 0..30 {
        let resp = gw.post_json(
            "/v1/chat/completions",
            TENANT_KEY,
            &chat("gpt-4o-mini", false),
        );
        assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    }
    let stats = mock.stats();
    assert_eq!(stats["requests"], 30, "{stats}");
    assert_eq!(stats["connections"], 1, "one connection for all: {stats}");
    let log = gw.log();
    assert!(!log.contains("reusable stream"), "{log}");
}
