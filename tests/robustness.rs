//! Issue 9: the bad-input catalog, connection floods and slow clients,
//! each against the real gateway, which must stay healthy after every case.

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// One raw HTTP/1 exchange on a fresh connection: the status of every
/// response read until the gateway closes it, and the first body's
/// OpenAI error code (`None` when the body is not an OpenAI error).
fn exchange(port: u16, request: &[u8]) -> (Vec<u16>, Option<String>) {
    let answer = raw_exchange(port, request, Duration::from_secs(10));
    let statuses = answer
        .match_indices("HTTP/1.")
        .filter_map(|(at, _)| answer.get(at + 9..at + 12)?.parse().ok())
        .collect();
    let code = answer
        .split_once("\r\n\r\n")
        .and_then(|(_, body)| {
            let end = body.find("\nHTTP/1.").unwrap_or(body.len());
            serde_json::from_str::<Value>(body[..end].trim()).ok()
        })
        .and_then(|v| v["error"]["code"].as_str().map(str::to_string));
    (statuses, code)
}

/// A `POST /v1/chat/completions` with `extra` header lines and `body`.
fn post(extra: &str, body: &[u8]) -> Vec<u8> {
    let mut request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {TENANT_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    request
}

const GOOD: &[u8] = br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;

/// The gateway still answers health checks and real requests.
fn assert_healthy(gw: &Gateway, after: &str) {
    let health = gw.get("/health", None);
    assert_eq!(health.status, 200, "/health after {after}");
    let chat = gw.post_json(
        "/v1/chat/completions",
        TENANT_KEY,
        &serde_json::from_slice(GOOD).unwrap(),
    );
    assert_eq!(chat.status, 200, "a normal request after {after}");
}

#[test]
fn bad_input_catalog_gets_exact_answers_and_the_gateway_stays_healthy() {
    let mock = Mock::start(&[]);
    let mut config = GatewayConfig::new(&mock);
    config.max_body = 64 * 1024;
    let gw = Gateway::start(&config);
    let big = format!(
        r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "z".repeat(100 * 1024)
    );
    let many_headers: String = (0..300).map(|i| format!("X-Filler-{i}: {i}\r\n")).collect();
    let huge_header = format!("X-Huge: {}\r\n", "h".repeat(40 * 1024));
    let auth = format!("Authorization: Bearer {TENANT_KEY}\r\n");
    let pipelined = [
        format!("POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n{auth}Content-Length: {}\r\n\r\n", GOOD.len()).into_bytes(),
        GOOD.to_vec(),
        format!("POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n", GOOD.len()).into_bytes(),
        GOOD.to_vec(),
    ]
    .concat();

    // (case, raw request, statuses in order, OpenAI error code of the first)
    type Case = (&'static str, Vec<u8>, Vec<u16>, Option<&'static str>);
    let cases: Vec<Case> = vec![
        ("malformed JSON", post("", b"{\"model\": "), vec![400], Some("invalid_json")),
        ("not JSON", post("", b"hello"), vec![400], Some("invalid_json")),
        ("invalid UTF-8", post("", b"{\"model\":\"gpt-4o-mini\",\"x\":\"\xff\xfe\"}"), vec![400], Some("invalid_json")),
        ("JSON but not an object", post("", b"[1,2]"), vec![400], Some("invalid_request")),
        ("mistyped model", post("", br#"{"model":5,"messages":[]}"#), vec![400], Some("invalid_value")),
        ("missing model", post("", br#"{"messages":[{"role":"user","content":"hi"}]}"#), vec![400], Some("missing_model")),
        ("empty model", post("", br#"{"model":"","messages":[]}"#), vec![400], Some("missing_model")),
        ("messages not an array", post("", br#"{"model":"gpt-4o-mini","messages":"hi"}"#), vec![400], Some("invalid_value")),
        ("mistyped stream", post("", br#"{"model":"gpt-4o-mini","messages":[],"stream":"yes"}"#), vec![400], Some("invalid_value")),
        ("chat without messages", post("", br#"{"model":"gpt-4o-mini"}"#), vec![400], Some("invalid_value")),
        ("body over the limit, declared", post("", big.as_bytes()), vec![413], Some("request_too_large")),
        ("body over the limit, chunked", chunked_chat_request(big.as_bytes()), vec![413], Some("request_too_large")),
        ("Content-Length and Transfer-Encoding", post("Transfer-Encoding: chunked\r\n", GOOD), vec![400], Some("invalid_request")),
        ("oversized headers", post(&huge_header, GOOD), vec![431], Some("request_header_fields_too_large")),
        // Refused by Pingora's parser before any hook runs: a bare 400 with an
        // empty body, and the connection closed.
        ("too many headers", post(&many_headers, GOOD), vec![400], None),
        ("unknown path", b"GET /v2/nothing HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n".to_vec(), vec![404], Some("unknown_url")),
        ("unknown method", b"DELETE /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n".to_vec(), vec![405], Some("method_not_allowed")),
        ("HTTP/1.0", [format!("POST /v1/chat/completions HTTP/1.0\r\n{auth}Content-Length: {}\r\n\r\n", GOOD.len()).into_bytes(), GOOD.to_vec()].concat(), vec![200], None),
        ("two pipelined requests", pipelined, vec![200, 200], None),
        // Upgrade is a hop-by-hop header: never passed on or switched to;
        // the request is served as plain HTTP.
        ("WebSocket upgrade", post("Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n", GOOD), vec![200], None),
        // CONNECT is refused by Pingora itself (no CONNECT proxying).
        ("CONNECT", b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\r\n".to_vec(), vec![405], None),
    ];
    let mut failures = Vec::new();
    for (case, request, statuses, code) in &cases {
        let got = exchange(gw.port, request);
        let want = (statuses.clone(), code.map(str::to_string));
        if got != want {
            failures.push(format!("{case}: got {got:?}, want {want:?}"));
        }
        assert_healthy(&gw, case);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(
        mock.request_count(),
        cases.len() as u64 + 4, // a normal request after each case, HTTP/1.0, two pipelined, the upgrade
        "only well-formed requests reach the provider"
    );
}

#[test]
fn a_flood_of_idle_connections_from_one_client_does_not_block_others() {
    let mock = Mock::start(&[]);
    let gw = Gateway::start(&GatewayConfig::new(&mock));
    // Bounded by this process's own open-files limit (each costs one here).
    let idle: Vec<TcpStream> = (0..800)
        .map_while(|_| TcpStream::connect(("127.0.0.1", gw.port)).ok())
        .collect();
    assert!(idle.len() >= 500, "opened only {} connections", idle.len());
    let started = Instant::now();
    for _ in 0..20 {
        assert_healthy(&gw, "opening the idle connections");
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "20 requests took {:?} beside {} idle connections",
        started.elapsed(),
        idle.len()
    );
    drop(idle);
    assert_healthy(&gw, "closing the idle connections");
}

#[test]
fn a_kept_alive_connection_left_idle_is_closed_after_the_idle_timeout() {
    let mock = Mock::start(&[]);
    let mut config = GatewayConfig::new(&mock);
    config.server_extra = "  client_idle_timeout_seconds: 1\n".into();
    let gw = Gateway::start(&config);
    let ask = |client: &mut TcpStream, keep_alive: &str| {
        let request = format!("GET /health HTTP/1.1\r\nHost: gw\r\n{keep_alive}\r\n");
        client.write_all(request.as_bytes()).unwrap();
        // The whole answer: its head, then its body by its length.
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            client.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .expect("a length")
            .trim()
            .parse()
            .unwrap();
        client.read_exact(&mut vec![0; length]).unwrap();
    };
    // Pingora waits for a kept-alive connection's next request for ever,
    // or for as long as the client's `Keep-Alive: timeout=` asks: both
    // used to stay open.
    for keep_alive in ["", "Keep-Alive: timeout=100000\r\n"] {
        let mut client = TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
        ask(&mut client, keep_alive);
        // Used again within the timeout, it is still served.
        ask(&mut client, keep_alive);
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let started = Instant::now();
        let mut rest = Vec::new();
        client
            .read_to_end(&mut rest)
            .expect("closed, not timed out");
        assert!(rest.is_empty(), "{rest:?}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "closed after {:?}",
            started.elapsed()
        );
    }
    assert_healthy(&gw, "idle connections closed");
}

#[test]
fn slow_clients_trickling_headers_do_not_starve_others() {
    let mock = Mock::start(&[]);
    let gw = Gateway::start(&GatewayConfig::new(&mock));
    // 200 clients that send a header byte at a time and never finish.
    let mut slow: Vec<TcpStream> = (0..200)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", gw.port)).expect("connect");
            s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nX-Slow: ")
                .expect("write");
            s
        })
        .collect();
    for round in 0..5 {
        for s in &mut slow {
            s.write_all(b"a")
                .expect("the gateway keeps a trickling client open");
        }
        assert_healthy(&gw, &format!("round {round} of trickled bytes"));
    }
    // A slow client that finishes is then served.
    let mut last = slow.pop().unwrap();
    last.write_all(
        format!(
            "\r\nAuthorization: Bearer {TENANT_KEY}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            GOOD.len()
        )
        .as_bytes(),
    )
    .unwrap();
    last.write_all(GOOD).unwrap();
    last.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = String::new();
    let _ = last.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// Prompt and completion tokens the gateway has counted so far.
fn tokens_counted(gw: &Gateway) -> f64 {
    metric_sum(&gw.metrics(), "runestone_tokens_total", &[])
}

#[test]
fn hostile_provider_catalog_gets_exact_answers_and_accounting_holds() {
    let mock = Mock::start(&["--tokens-per-second", "50"]);
    let mut config = GatewayConfig::new(&mock);
    config.providers = vec![format!(
        "  - {{ name: mock, kind: openai, base_url: \"{}\", api_key: \"{PROVIDER_KEY}\", timeouts: {{ idle_ms: 500 }} }}",
        mock.base_url()
    )];
    let gw = Gateway::start(&config);
    let giant_line = format!("data: {}", "x".repeat(3 * 1024 * 1024));
    let echo = format!(
        r#"{{"error":{{"message":"Incorrect API key provided: {PROVIDER_KEY}","type":"invalid_request_error"}}}}"#
    );
    let usage_body = |usage: &str| {
        format!(
            r#"{{"id":"x","object":"chat.completion","choices":[{{"index":0,"message":{{"role":"assistant","content":"hello there"}},"finish_reason":"stop"}}],"usage":{usage}}}"#
        )
    };
    // (case, mock fault, stream, status, what the body must show, most
    // tokens the gateway may count for it)
    type Case = (&'static str, Value, bool, u16, &'static str, f64);
    let cases: Vec<Case> = vec![
        (
            "a 200 that is not JSON: the provider's failure, nothing billed",
            json!({"status": 200, "error_body": "plain words, not JSON"}),
            false,
            502,
            "not JSON",
            0.0,
        ),
        (
            "a giant SSE line: passed on, not held",
            json!({"status": 200, "content_type": "text/event-stream", "error_body": giant_line}),
            true,
            200,
            "xxxx",
            1_000_000.0,
        ),
        (
            "a stream that never ends: cut after the idle timeout with an error event",
            json!({"stall_after_chunks": 2, "stall_ms": 60_000}),
            true,
            200,
            "\"error\"",
            1000.0,
        ),
        (
            "negative usage: ignored, estimated instead",
            json!({"status": 200, "content_type": "application/json", "error_body": usage_body(r#"{"prompt_tokens":-5,"completion_tokens":-7}"#)}),
            false,
            200,
            "hello there",
            1000.0,
        ),
        (
            "absurd usage: ignored, estimated instead",
            json!({"status": 200, "content_type": "application/json", "error_body": usage_body(r#"{"prompt_tokens":1000000000000,"completion_tokens":5}"#)}),
            false,
            200,
            "hello there",
            1000.0,
        ),
        (
            "the provider echoes the gateway's key: masked",
            json!({"status": 400, "error_body": echo}),
            false,
            400,
            "Incorrect API key provided: *****",
            0.0,
        ),
    ];
    for (case, fault, stream, status, shows, most_tokens) in cases {
        let mut fault = fault;
        fault["path"] = json!("/v1/chat/completions");
        mock.fault(fault);
        let before = tokens_counted(&gw);
        let started = Instant::now();
        let (got, body) = if stream {
            let mut body = String::new();
            let got = read_sse(
                gw.port,
                TENANT_KEY,
                &chat("gpt-4o-mini", true),
                |data, _| body.push_str(data),
            );
            (got, body)
        } else {
            let resp = gw.post_json(
                "/v1/chat/completions",
                TENANT_KEY,
                &chat("gpt-4o-mini", false),
            );
            (
                resp.status,
                String::from_utf8_lossy(&resp.body).into_owned(),
            )
        };
        assert_eq!(got, status, "{case}");
        assert!(
            body.contains(shows),
            "{case}: {}",
            &body[..body.len().min(300)]
        );
        assert!(
            !body.contains(PROVIDER_KEY),
            "{case}: the provider key leaked"
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{case}: took {:?}",
            started.elapsed()
        );
        let mut counted = 0.0;
        wait_until(
            Duration::from_secs(5),
            "the request to be accounted",
            || {
                counted = tokens_counted(&gw) - before;
                most_tokens == 0.0 || counted > 0.0
            },
        );
        assert!(counted <= most_tokens, "{case}: counted {counted} tokens");
        assert_healthy(&gw, case);
    }
}
