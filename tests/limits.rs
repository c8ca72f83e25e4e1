//! Tenant admission and cost accounting through real processes: exact
//! admission counts per limit (in-process and in Redis), settlement,
//! concurrency slots, budgets, accounting against the provider's own
//! usage report, and Redis failures.

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

const PRICING: &str = "pricing:\n  gpt-4o-mini: { input: 1.0, output: 2.0, cached_input: 0.5 }\n";

/// A gateway whose tenant `acme` has these limits (YAML flow mapping).
/// Redis is given 2 s to answer: a call over its timeout marks Redis down
/// and the limits go in-process, which only the outage tests want to see
/// (a loaded machine must not change the others' counts).
fn limited(mock: &Mock, limits: &str, redis: Option<&Redis>) -> GatewayConfig {
    limited_within(mock, limits, redis, 2000)
}

/// [`limited`], with Redis's timeout for a test about Redis not answering.
fn limited_within(
    mock: &Mock,
    limits: &str,
    redis: Option<&Redis>,
    redis_timeout_ms: u64,
) -> GatewayConfig {
    let mut config = GatewayConfig::new(mock);
    config.tenants =
        format!("\n  - id: acme\n    keys: [\"{TENANT_KEY}\"]\n    limits: {limits}\n");
    config.extra = PRICING.to_string();
    if let Some(redis) = redis {
        config.extra += &format!(
            "redis: {{ url: \"{}\", timeout_ms: {redis_timeout_ms} }}\n",
            redis.url()
        );
    }
    config
}

/// Sends `n` chat requests at once; returns their responses.
fn burst(gw: &Gateway, n: usize, body: &Value) -> Vec<Response> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n)
            .map(|_| scope.spawn(|| gw.post_json("/v1/chat/completions", TENANT_KEY, body)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn count(responses: &[Response], status: u16) -> usize {
    responses.iter().filter(|r| r.status == status).count()
}

fn check_exact_rpm_burst(redis: Option<&Redis>) {
    let mock = Mock::start(&[]);
    let gw = Gateway::start(&limited(&mock, "{ requests_per_minute: 5 }", redis));
    let responses = burst(&gw, 8, &chat("gpt-4o-mini", false));
    assert_eq!(count(&responses, 200), 5, "exactly the limit is admitted");
    assert_eq!(count(&responses, 429), 3);
    assert_eq!(
        mock.request_count(),
        5,
        "refused requests never reach the provider"
    );
    for refused in responses.iter().filter(|r| r.status == 429) {
        assert_eq!(refused.error_code(), "rate_limit_exceeded");
        assert_eq!(refused.json()["error"]["type"], "rate_limit_error");
        let ms: u64 = refused.header("retry-after-ms").unwrap().parse().unwrap();
        // One request frees up every 60 s / 5 = 12 s.
        assert!((11_000..=12_000).contains(&ms), "retry-after-ms {ms}");
        assert_eq!(
            refused.header("retry-after"),
            Some(ms.div_ceil(1000).to_string().as_str())
        );
        assert_eq!(refused.header("x-ratelimit-limit-requests"), Some("5"));
        assert_eq!(refused.header("x-ratelimit-remaining-requests"), Some("0"));
    }
    let metrics = gw.metrics();
    assert_eq!(
        metric_value(
            &metrics,
            r#"runestone_rate_limited_total{limit="rpm",tenant="acme"}"#
        ),
        3.0
    );
}

#[test]
fn admits_exactly_the_rpm_limit_in_a_burst_in_process() {
    check_exact_rpm_burst(None);
}

#[test]
fn admits_exactly_the_rpm_limit_in_a_burst_with_redis() {
    let redis = Redis::start();
    check_exact_rpm_burst(Some(&redis));
    let keys = redis.cli(&["KEYS", "*"]);
    assert!(
        keys.contains("runestone:{acme}:rate"),
        "tenant keys share a hash tag: {keys}"
    );
}

#[test]
fn admitted_responses_carry_the_tenants_rate_limit_headers() {
    let mock = Mock::start(&[]);
    let gw = Gateway::start(&limited(
        &mock,
        "{ requests_per_minute: 5, tokens_per_minute: 100000 }",
        None,
    ));
    let mut remaining = Vec::new();
    for _ in 0..5 {
        let resp = gw.post_json(
            "/v1/chat/completions",
            TENANT_KEY,
            &chat("gpt-4o-mini", false),
        );
        assert_eq!(resp.status, 200);
        assert_eq!(resp.header("x-ratelimit-limit-requests"), Some("5"));
        assert_eq!(resp.header("x-ratelimit-limit-tokens"), Some("100000"));
        assert!(resp
            .header("x-ratelimit-reset-requests")
            .is_some_and(|r| r.ends_with('s')));
        assert!(resp.header("x-ratelimit-remaining-tokens").is_some());
        remaining.push(
            resp.header("x-ratelimit-remaining-requests")
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(remaining, ["4", "3", "2", "1", "0"]);
}

#[test]
fn an_admitted_request_that_fails_upstream_still_carries_the_rate_limit_headers() {
    let mock = Mock::start(&[]);
    let gw = Gateway::start(&limited(
        &mock,
        "{ requests_per_minute: 5, tokens_per_minute: 100000 }",
        None,
    ));
    mock.fault(json!({"status": 503, "count": 100}));
    let resp = gw.post_json(
        "/v1/chat/completions",
        TENANT_KEY,
        &chat("gpt-4o-mini", false),
    );
    assert!(resp.status >= 500, "{}", resp.status);
    assert_eq!(resp.header("x-ratelimit-limit-requests"), Some("5"));
    assert_eq!(resp.header("x-ratelimit-remaining-requests"), Some("4"));
    assert_eq!(resp.header("x-ratelimit-limit-tokens"), Some("100000"));
}

fn check_exact_tpm(redis: Option<&Redis>) {
    let mock = Mock::start(&["--latency-ms", "300"]);
    let mut body = chat("gpt-4o-mini", false);
    body["max_tokens"] = json!(100);
    // The documented reservation: body bytes / 4 (rounded up) + max_tokens.
    let estimate = (body.to_string().len() as u64).div_ceil(4) + 100;
    let tpm = 3 * estimate + estimate / 2;
    let gw = Gateway::start(&limited(
        &mock,
        &format!("{{ tokens_per_minute: {tpm} }}"),
        redis,
    ));
    let responses = burst(&gw, 5, &body);
    assert_eq!(count(&responses, 200), 3, "tpm {tpm}, estimate {estimate}");
    let refused = responses.iter().find(|r| r.status == 429).unwrap();
    assert_eq!(refused.error_code(), "rate_limit_exceeded");
    assert!(
        refused
            .header("retry-after-ms")
            .unwrap()
            .parse::<u64>()
            .unwrap()
            > 0
    );

    // Settlement refunded the unused reservation: the real usage is far
    // below the estimate, so another request fits at once.
    let used: u64 = responses
        .iter()
        .filter(|r| r.status == 200)
        .map(|r| r.json()["usage"]["total_tokens"].as_u64().unwrap())
        .sum();
    assert!(used < 3 * estimate);
    let resp = gw.post_json("/v1/chat/completions", TENANT_KEY, &body);
    assert_eq!(resp.status, 200, "refund after settlement");
    let remaining: u64 = resp
        .header("x-ratelimit-remaining-tokens")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        remaining + used + estimate >= tpm,
        "remaining {remaining}, used {used}, estimate {estimate}"
    );
}

#[test]
fn admits_exactly_the_tpm_limit_and_refunds_at_settlement_in_process() {
    check_exact_tpm(None);
}

#[test]
fn admits_exactly_the_tpm_limit_and_refunds_at_settlement_with_redis() {
    let redis = Redis::start();
    check_exact_tpm(Some(&redis));
}

#[test]
fn settlement_charges_overruns() {
    let mock = Mock::start(&[]);
    let gw = Gateway::start(&limited(&mock, "{ tokens_per_minute: 5000 }", None));
    // No max_tokens: the gateway reserves the documented default (1024).
    let mut body = chat("gpt-4o-mini", false);
    body["mock_tokens"] = json!(2000);
    let resp = gw.post_json("/v1/chat/completions", TENANT_KEY, &body);
    assert_eq!(resp.status, 200);
    let used = resp.json()["usage"]["total_tokens"].as_u64().unwrap();
    assert!(
        used > 2000,
        "the provider generated past the estimate: {used}"
    );
    let small = chat("gpt-4o-mini", false);
    let next = gw.post_json("/v1/chat/completions", TENANT_KEY, &small);
    let remaining: u64 = next
        .header("x-ratelimit-remaining-tokens")
        .unwrap()
        .parse()
        .unwrap();
    // 5000/min refills ~83 tokens a second; the test takes well under one.
    assert!(
        remaining < 5000 - used + 200,
        "overrun charged: remaining {remaining}, used {used}"
    );
}

fn check_concurrency(redis: Option<&Redis>) {
    let mock = Mock::start(&["--latency-ms", "400"]);
    let gw = Gateway::start(&limited(&mock, "{ max_concurrent: 1 }", redis));
    let responses = burst(&gw, 3, &chat("gpt-4o-mini", false));
    assert_eq!(count(&responses, 200), 1);
    let refused: Vec<_> = responses.iter().filter(|r| r.status == 429).collect();
    assert_eq!(refused.len(), 2);
    for r in refused {
        assert_eq!(r.error_code(), "rate_limit_exceeded");
        assert!(r.header("retry-after-ms").is_some());
    }
    for _ in 0..3 {
        let resp = gw.post_json(
            "/v1/chat/completions",
            TENANT_KEY,
            &chat("gpt-4o-mini", false),
        );
        assert_eq!(
            resp.status, 200,
            "sequential requests never exceed one slot"
        );
    }
    let metrics = gw.metrics();
    assert_eq!(
        metric_value(&metrics, r#"runestone_inflight_requests{tenant="acme"}"#),
        0.0
    );
    assert_eq!(
        metric_value(
            &metrics,
            r#"runestone_rate_limited_total{limit="concurrency",tenant="acme"}"#
        ),
        2.0
    );
}

#[test]
fn holds_concurrency_to_the_limit_in_process() {
    check_concurrency(None);
}

#[test]
fn holds_concurrency_to_the_limit_with_redis_leases() {
    let redis = Redis::start();
    check_concurrency(Some(&redis));
    assert_eq!(
        redis.cli(&["ZCARD", "runestone:{acme}:inflight"]).trim(),
        "0",
        "leases released"
    );
}

fn check_slot_released_on_disconnect(redis: Option<&Redis>) {
    let mock = Mock::start(&["--tokens-per-second", "20"]);
    let gw = Gateway::start(&limited(&mock, "{ max_concurrent: 1 }", redis));
    let mut body = chat("gpt-4o-mini", true);
    body["mock_tokens"] = json!(200); // ten seconds of stream
    let body = body.to_string();
    let mut stream = TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
    write!(
        stream,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TENANT_KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    while !line.starts_with("data:") {
        line.clear();
        reader.read_line(&mut line).unwrap();
    }
    let busy = gw.post_json(
        "/v1/chat/completions",
        TENANT_KEY,
        &chat("gpt-4o-mini", false),
    );
    assert_eq!(busy.status, 429, "the stream holds the only slot");
    drop(reader);
    stream.shutdown(std::net::Shutdown::Both).unwrap();
    drop(stream);
    wait_until(Duration::from_secs(5), "the slot to be released", || {
        metric_value(
            &gw.metrics(),
            r#"runestone_inflight_requests{tenant="acme"}"#,
        ) == 0.0
    });
    let resp = gw.post_json(
        "/v1/chat/completions",
        TENANT_KEY,
        &chat("gpt-4o-mini", false),
    );
    assert_eq!(resp.status, 200);
    wait_until(
        Duration::from_secs(5),
        "the provider to see the cancellation",
        || mock.stats()["disconnects"].as_u64() == Some(1),
    );
}

#[test]
fn releases_the_slot_when_the_client_disconnects_mid_stream() {
    check_slot_released_on_disconnect(None);
}

#[test]
fn releases_the_redis_lease_when_the_client_disconnects_mid_stream() {
    let redis = Redis::start();
    check_slot_released_on_disconnect(Some(&redis));
}

#[test]
fn a_client_that_leaves_before_its_answer_is_billed_the_prompt_sent() {
    // Leaving once the request went to the provider, before any answer
    // came back (a JSON answer, a stream's first content): the provider
    // has the prompt and works on it, so the tenant is billed it, and its
    // tokens stay counted in the minute (else leaving early would cost
    // nothing, past budgets and token limits).
    let mock = Mock::start(&[]);
    let gw = Gateway::start(&limited(&mock, "{ tokens_per_minute: 1000000 }", None));
    mock.fault(json!({"latency_ms": 5000}));
    for (sent, stream) in [false, true].into_iter().enumerate() {
        let body = chat("gpt-4o-mini", stream).to_string();
        let mut conn = TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
        write!(
            conn,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TENANT_KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        wait_until(
            Duration::from_secs(5),
            "the provider to have the request",
            || mock.requests().len() > sent,
        );
        conn.shutdown(std::net::Shutdown::Both).unwrap();
    }
    let billed = || {
        let usage = gw.get("/v1/usage", Some(TENANT_KEY)).json();
        (
            usage["requests"].as_u64(),
            usage["cost_usd"].as_f64().unwrap_or(0.0),
        )
    };
    wait_until(
        Duration::from_secs(5),
        "both requests to be settled",
        || billed().0 == Some(2),
    );
    let prompt = metric_sum(
        &gw.metrics(),
        "runestone_tokens_total",
        &["kind=\"prompt\""],
    );
    let completion = metric_sum(
        &gw.metrics(),
        "runestone_tokens_total",
        &["kind=\"completion\""],
    );
    assert!(prompt >= 2.0 && completion == 0.0, "{prompt} {completion}");
    assert!(
        (billed().1 - prompt / 1e6).abs() < 1e-12,
        "the prompt at $1 a million: {:?}",
        billed()
    );
    let lines: Vec<Value> = gw
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["type"] == "access" && l["endpoint"] == "chat")
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    for line in &lines {
        assert_eq!(line["error"], "client_closed", "{line}");
        assert_eq!(line["usage_estimated"], true, "{line}");
        assert_eq!(line["prompt_tokens"].as_f64(), Some(prompt / 2.0), "{line}");
    }
}

fn check_budget(redis: Option<&Redis>) {
    let mock = Mock::start(&[]);
    // Each request costs (7 * $1 + 16 * $2) / 1M = $0.000039.
    let gw = Gateway::start(&limited(
        &mock,
        "{ budget_usd: { amount: 0.0001, period: daily } }",
        redis,
    ));
    let mut spent = 0.0;
    let mut served = 0;
    loop {
        let resp = gw.post_json(
            "/v1/chat/completions",
            TENANT_KEY,
            &chat("gpt-4o-mini", false),
        );
        if resp.status == 429 {
            assert_eq!(resp.error_code(), "insufficient_quota");
            assert_eq!(resp.json()["error"]["type"], "insufficient_quota");
            let secs: u64 = resp.header("retry-after").unwrap().parse().unwrap();
            assert!(
                (1..=86_400).contains(&secs),
                "retry at the end of the UTC day: {secs}"
            );
            break;
        }
        assert_eq!(resp.status, 200);
        assert!(spent < 0.0001, "served after the budget was spent");
        let usage = &resp.json()["usage"];
        spent += (usage["prompt_tokens"].as_f64().unwrap()
            + 2.0 * usage["completion_tokens"].as_f64().unwrap())
            / 1e6;
        served += 1;
        assert!(served < 10, "budget never enforced");
    }
    assert!(spent >= 0.0001);
    assert_eq!(served, 3);
    let usage = gw.get("/v1/usage", Some(TENANT_KEY)).json();
    assert_eq!(usage["period"], "daily");
    assert_eq!(usage["requests"], 3);
    assert!(
        (usage["cost_usd"].as_f64().unwrap() - spent).abs() < 1e-12,
        "{usage}"
    );
    assert_eq!(usage["budget"]["remaining_usd"], 0.0);
    let metrics = gw.metrics();
    assert_eq!(
        metric_value(
            &metrics,
            r#"runestone_rate_limited_total{limit="budget",tenant="acme"}"#
        ),
        1.0
    );
}

#[test]
fn refuses_with_insufficient_quota_once_the_budget_is_spent_in_process() {
    check_budget(None);
}

#[test]
fn refuses_with_insufficient_quota_once_the_budget_is_spent_with_redis() {
    let redis = Redis::start();
    check_budget(Some(&redis));
}

#[test]
fn a_spent_total_budget_tells_clients_not_to_retry() {
    let mock = Mock::start(&[]);
    let gw = Gateway::start(&limited(
        &mock,
        "{ budget_usd: { amount: 0.00001, period: total } }",
        None,
    ));
    assert_eq!(
        gw.post_json(
            "/v1/chat/completions",
            TENANT_KEY,
            &chat("gpt-4o-mini", false)
        )
        .status,
        200
    );
    let resp = gw.post_json(
        "/v1/chat/completions",
        TENANT_KEY,
        &chat("gpt-4o-mini", false),
    );
    assert_eq!(resp.status, 429);
    assert_eq!(resp.header("x-should-retry"), Some("false"));
    assert_eq!(resp.header("retry-after"), None);
}

/// Reads a whole SSE response; returns the parsed `data:` events.
fn sse_events(gw: &Gateway, body: &Value) -> Vec<Value> {
    let mut events = Vec::new();
    read_sse(gw.port, TENANT_KEY, body, |data, _| {
        if data != "[DONE]" {
            events.push(serde_json::from_str(data).unwrap());
        }
    });
    events
}

fn check_accounting_matches_the_provider(redis: Option<&Redis>) {
    let mock = Mock::start(&[]);
    let gw = Gateway::start(&limited(&mock, "{ requests_per_minute: 1000 }", redis));
    gw.post_json(
        "/v1/chat/completions",
        TENANT_KEY,
        &chat("gpt-4o-mini", false),
    );
    gw.post_json(
        "/v1/completions",
        TENANT_KEY,
        &json!({"model": "gpt-4o-mini", "prompt": "Once upon a time"}),
    );

    // A stream whose client asked for usage gets the usage chunk ...
    let mut asked = chat("gpt-4o-mini", true);
    asked["stream_options"] = json!({"include_usage": true});
    let events = sse_events(&gw, &asked);
    assert!(events.last().unwrap()["usage"]["completion_tokens"]
        .as_u64()
        .is_some());
    assert!(
        events.iter().all(|e| e.get("usage").is_some()),
        "with include_usage every chunk has usage"
    );

    // ... one that did not ask sees exactly what the provider would send.
    let events = sse_events(&gw, &chat("gpt-4o-mini", true));
    assert!(
        events.iter().all(|e| e.get("usage").is_none()),
        "no usage chunk or field: {events:?}"
    );
    assert_eq!(
        events.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );
    assert!(
        mock.requests().last().unwrap()["body_bytes"]
            .as_u64()
            .unwrap()
            > 0
    );

    let usage = gw.get("/v1/usage", Some(TENANT_KEY)).json();
    let stats = mock.stats();
    assert_eq!(usage["requests"], 4);
    assert_eq!(
        usage["prompt_tokens"], stats["prompt_tokens"],
        "{usage} vs {stats}"
    );
    assert_eq!(
        usage["completion_tokens"], stats["completion_tokens"],
        "{usage} vs {stats}"
    );
    let expected_cost = (stats["prompt_tokens"].as_f64().unwrap()
        + 2.0 * stats["completion_tokens"].as_f64().unwrap())
        / 1e6;
    assert!((usage["cost_usd"].as_f64().unwrap() - expected_cost).abs() < 1e-12);

    let metrics = gw.metrics();
    let prompt = metric_value(
        &metrics,
        r#"runestone_tokens_total{kind="prompt",model="gpt-4o-mini",tenant="acme"}"#,
    );
    let completion = metric_value(
        &metrics,
        r#"runestone_tokens_total{kind="completion",model="gpt-4o-mini",tenant="acme"}"#,
    );
    assert_eq!(prompt, stats["prompt_tokens"].as_f64().unwrap());
    assert_eq!(completion, stats["completion_tokens"].as_f64().unwrap());
    let cost = metric_value(
        &metrics,
        r#"runestone_cost_usd_total{model="gpt-4o-mini",tenant="acme"}"#,
    );
    assert!((cost - expected_cost).abs() < 1e-9);
}

#[test]
fn accounts_exactly_the_providers_usage_in_process() {
    check_accounting_matches_the_provider(None);
}

#[test]
fn accounts_exactly_the_providers_usage_with_redis() {
    let redis = Redis::start();
    check_accounting_matches_the_provider(Some(&redis));
}

#[test]
fn estimates_usage_when_the_provider_reports_none() {
    let mock = Mock::start(&[]);
    let gw = Gateway::start(&limited(&mock, "{ requests_per_minute: 1000 }", None));
    mock.fault(json!({"no_usage": true}));
    let mut body = chat("gpt-4o-mini", true);
    body["mock_tokens"] = json!(12);
    let events = sse_events(&gw, &body);
    assert_eq!(events.len(), 14, "role, 12 tokens, finish");
    let usage = gw.get("/v1/usage", Some(TENANT_KEY)).json();
    // The documented count: the prompt's text with the chat format's three
    // tokens per message and three to prime the answer, and the generated
    // text, with the encoding of the model served (mock-small: cl100k).
    let encoding = runestone::cost::Encoding::for_model("mock-small");
    let generated: String = (0..12).map(|i| format!("tok{i} ")).collect();
    assert_eq!(
        usage["prompt_tokens"],
        encoding.count("Say hello\n") + 3 + 3
    );
    assert_eq!(usage["completion_tokens"], encoding.count(&generated));
    assert_eq!(usage["estimated_requests"], 1);

    mock.fault(json!({"no_usage": true}));
    let resp = gw.post_json(
        "/v1/chat/completions",
        TENANT_KEY,
        &chat("gpt-4o-mini", false),
    );
    assert!(resp.json().get("usage").is_none());
    let after = gw.get("/v1/usage", Some(TENANT_KEY)).json();
    assert!(
        after["completion_tokens"].as_u64() > usage["completion_tokens"].as_u64(),
        "never nothing"
    );
}

#[test]
fn counts_a_stream_cut_mid_way() {
    let mock = Mock::start(&[]);
    let gw = Gateway::start(&limited(&mock, "{ requests_per_minute: 1000 }", None));
    mock.fault(json!({"disconnect_after_chunks": 5}));
    let mut body = chat("gpt-4o-mini", true);
    body["mock_tokens"] = json!(50);
    let mut data = Vec::new();
    read_sse(gw.port, TENANT_KEY, &body, |d, _| data.push(d.to_string()));
    assert!(
        data.last().unwrap().contains("\"error\""),
        "the break reaches the client in-band: {data:?}"
    );
    assert!(!data.iter().any(|d| d == "[DONE]"));
    let usage = gw.get("/v1/usage", Some(TENANT_KEY)).json();
    let generated: String = (0..5).map(|i| format!("tok{i} ")).collect();
    assert_eq!(
        usage["completion_tokens"],
        runestone::cost::Encoding::for_model("mock-small").count(&generated),
        "what was forwarded is counted"
    );
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 0);
    assert_eq!(
        metric_value(
            &gw.metrics(),
            r#"runestone_inflight_requests{tenant="acme"}"#
        ),
        0.0
    );
}

#[test]
fn a_cut_stream_frees_its_slot_before_the_client_sees_its_end() {
    // With Redis the settlement is a round trip: a wide window.
    let redis = Redis::start();
    let mock = Mock::start(&[]);
    let gw = Gateway::start(&limited(&mock, "{ max_concurrent: 1 }", Some(&redis)));
    let request = |body: &Value, close: &str| {
        let body = body.to_string();
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {TENANT_KEY}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n{close}\r\n{body}",
            body.len()
        )
    };
    let mut stream_body = chat("gpt-4o-mini", true);
    stream_body["mock_tokens"] = json!(20);
    let stream_request = request(&stream_body, "");
    let next_request = request(&chat("gpt-4o-mini", false), "Connection: close\r\n");
    // Cut with nowhere to resume (the default): the in-band error and the
    // last chunk end the stream, and the next request, sent the moment
    // that end is read (on a connection already open), finds the slot
    // free. Before, the slot was freed only after the end went out.
    for round in 0..30 {
        mock.fault(json!({"disconnect_after_chunks": 2}));
        let (mut first, mut second) = (connect(gw.port), connect(gw.port));
        first.write_all(stream_request.as_bytes()).unwrap();
        read_head(&mut first);
        let events = read_chunked(&mut first);
        assert!(String::from_utf8_lossy(&events).contains("\"error\""));
        second.write_all(next_request.as_bytes()).unwrap();
        let answer = read_head(&mut second);
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "round {round}: {answer}"
        );
    }
}

#[test]
fn two_gateways_on_one_redis_enforce_one_global_limit() {
    let redis = Redis::start();
    let mock = Mock::start(&[]);
    let gw1 = Gateway::start(&limited(&mock, "{ requests_per_minute: 6 }", Some(&redis)));
    let gw2 = Gateway::start(&limited(&mock, "{ requests_per_minute: 6 }", Some(&redis)));
    let (a, b) = std::thread::scope(|scope| {
        let a = scope.spawn(|| burst(&gw1, 5, &chat("gpt-4o-mini", false)));
        let b = scope.spawn(|| burst(&gw2, 5, &chat("gpt-4o-mini", false)));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!(count(&a, 200) + count(&b, 200), 6);
    assert_eq!(mock.request_count(), 6);
}

#[test]
fn keeps_serving_when_redis_is_killed_and_flushes_spend_when_it_returns() {
    let redis = Redis::start();
    let mock = Mock::start(&[]);
    let gw = Gateway::start(&limited(
        &mock,
        "{ requests_per_minute: 1000, max_concurrent: 10 }",
        Some(&redis),
    ));
    assert_eq!(
        gw.post_json(
            "/v1/chat/completions",
            TENANT_KEY,
            &chat("gpt-4o-mini", false)
        )
        .status,
        200
    );
    let port = redis.kill();
    for _ in 0..5 {
        let resp = gw.post_json(
            "/v1/chat/completions",
            TENANT_KEY,
            &chat("gpt-4o-mini", false),
        );
        assert_eq!(resp.status, 200, "served on in-process limits");
    }
    let metrics = gw.metrics();
    assert_eq!(metric_value(&metrics, "runestone_redis_up"), 0.0);
    assert!(gw.log().contains("Redis unavailable"));
    let redis = Redis::start_on(port);
    wait_until(
        Duration::from_secs(10),
        "the gateway to see Redis again",
        || metric_value(&gw.metrics(), "runestone_redis_up") == 1.0,
    );
    let period = gw.get("/v1/usage", Some(TENANT_KEY)).json()["period_id"]
        .as_str()
        .unwrap()
        .to_string();
    let key = format!("runestone:{{acme}}:usage:{period}");
    wait_until(
        Duration::from_secs(10),
        "spend kept during the outage to be flushed",
        || redis.cli(&["HGET", &key, "requests"]).trim() == "5",
    );
    assert_eq!(
        gw.post_json(
            "/v1/chat/completions",
            TENANT_KEY,
            &chat("gpt-4o-mini", false)
        )
        .status,
        200
    );
}

#[test]
fn keeps_serving_when_redis_is_frozen() {
    let redis = Redis::start();
    let mock = Mock::start(&[]);
    let gw = Gateway::start(&limited_within(
        &mock,
        "{ requests_per_minute: 1000, max_concurrent: 10 }",
        Some(&redis),
        250,
    ));
    assert_eq!(
        gw.post_json(
            "/v1/chat/completions",
            TENANT_KEY,
            &chat("gpt-4o-mini", false)
        )
        .status,
        200
    );
    redis.freeze();
    for _ in 0..5 {
        // Each call is bounded by redis.timeout_ms: nothing hangs.
        let resp = gw.post_json(
            "/v1/chat/completions",
            TENANT_KEY,
            &chat("gpt-4o-mini", false),
        );
        assert_eq!(resp.status, 200);
    }
    let metrics = gw.metrics();
    assert_eq!(metric_value(&metrics, "runestone_redis_up"), 0.0);
    assert!(metric_value(&metrics, r#"runestone_redis_errors_total{op="admit"}"#) >= 1.0);
    redis.thaw();
    wait_until(
        Duration::from_secs(10),
        "the gateway to see Redis again",
        || metric_value(&gw.metrics(), "runestone_redis_up") == 1.0,
    );
    assert_eq!(
        gw.post_json(
            "/v1/chat/completions",
            TENANT_KEY,
            &chat("gpt-4o-mini", false)
        )
        .status,
        200
    );
}

/// Redis admissions and settlements that wait together go together: one
/// script run for a whole burst (group commit), every decision still exact.
/// The limiter runs on one thread here, so the burst is queued before the
/// batching task runs: one batch, deterministically.
#[test]
fn redis_admissions_and_settlements_are_group_committed() {
    use runestone::config::Config;
    use runestone::cost::Usage;
    use runestone::limits::{LimitKind, Limiter, Settlement};

    let redis = Redis::start();
    let yaml = format!(
        r#"
server: {{ listen: "127.0.0.1:1" }}
providers: [{{ name: p, base_url: "http://127.0.0.1:1/v1" }}]
models: [{{ name: m, targets: [{{ provider: p }}] }}]
pricing: {{ m: {{ input: 1.0, output: 2.0 }} }}
tenants:
  - {{ id: t, keys: ["sk-batch"], limits: {{ requests_per_minute: 30, max_concurrent: 100 }} }}
redis: {{ url: "{}", timeout_ms: 5000 }}
"#,
        redis.url()
    );
    let config = Config::from_yaml(&yaml, |_| None).expect("valid config");
    let settlement = || Settlement {
        cache_saved_pusd: None,
        usage: Usage {
            prompt_tokens: 5,
            completion_tokens: 7,
            cached_tokens: 0,
            estimated: false,
            ..Default::default()
        },
        cost_pusd: 100,
        duration: Duration::from_millis(10),
    };
    let script_runs = || {
        let stats = redis.cli(&["INFO", "commandstats"]);
        stats
            .lines()
            .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
            .and_then(|rest| rest.split(',').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let limiter = Limiter::new(
            &config,
            runestone::redis_conn::RedisConnection::for_config(&config),
        );
        // Connects (the maintenance service does it in the gateway) and
        // loads the scripts.
        limiter.redis().unwrap().connect().await;
        let first = limiter.admit(0, 1).await.expect("the first is admitted");
        limiter.settle(first, settlement()).await;
        redis.cli(&["CONFIG", "RESETSTAT"]);

        let burst: Vec<_> = (0..50)
            .map(|_| {
                let limiter = limiter.clone();
                tokio::spawn(async move { limiter.admit(0, 1).await })
            })
            .collect();
        let mut grants = Vec::new();
        let mut refused = 0;
        for task in burst {
            match task.await.unwrap() {
                Ok(grant) => grants.push(grant),
                Err(refusal) => {
                    assert_eq!(refusal.limit, LimitKind::Requests);
                    refused += 1;
                }
            }
        }
        assert_eq!(grants.len(), 29, "30 per minute, one already taken");
        assert_eq!(refused, 21);
        assert_eq!(script_runs(), 1, "the burst's admissions in one script run");
        let held = redis.cli(&["ZCARD", "runestone:{t}:inflight"]);
        assert_eq!(held.trim(), "29", "a lease per admission");

        let settles: Vec<_> = grants
            .into_iter()
            .map(|grant| {
                let limiter = limiter.clone();
                tokio::spawn(async move { limiter.settle(grant, settlement()).await })
            })
            .collect();
        for task in settles {
            task.await.unwrap();
        }
        assert_eq!(script_runs(), 2, "their settlements in one more");
        assert!(limiter.redis().unwrap().is_up());

        let report = limiter.usage(0).await;
        assert!(!report.partial);
        assert_eq!(report.usage.requests, 30);
        assert_eq!(report.usage.prompt_tokens, 150);
        assert_eq!(report.usage.completion_tokens, 210);
        assert_eq!(report.usage.cost_pusd, 3000);
    });
    // Every lease was released.
    let inflight = redis.cli(&["ZCARD", "runestone:{t}:inflight"]);
    assert_eq!(inflight.trim(), "0");
}

/// A runtime for driving a limiter directly (two workers, timers on).
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A limiter on a real redis-server for tenant `t` with these limits and
/// Redis timeout (a call not answered within it marks Redis down: only a
/// test about that gives a short one, or a loaded machine changes its
/// outcome), and
/// its maintenance service (probe, flush, lease renewal) running.
fn redis_limiter(
    redis: &Redis,
    limits: &str,
    timeout_ms: u64,
) -> (runestone::limits::Limiter, tokio::sync::watch::Sender<bool>) {
    redis_limiter_keeping_debts(redis, limits, timeout_ms, None)
}

/// [`redis_limiter`], keeping what it owes Redis beside `pid_file` as the
/// gateway's process does.
fn redis_limiter_keeping_debts(
    redis: &Redis,
    limits: &str,
    timeout_ms: u64,
    pid_file: Option<&str>,
) -> (runestone::limits::Limiter, tokio::sync::watch::Sender<bool>) {
    use runestone::config::Config;
    use runestone::limits::{redis::RedisMaintenance, Limiter};
    let yaml = format!(
        r#"
server: {{ listen: "127.0.0.1:1" }}
providers: [{{ name: p, base_url: "http://127.0.0.1:1/v1" }}]
models: [{{ name: m, targets: [{{ provider: p }}] }}]
pricing: {{ m: {{ input: 1.0, output: 2.0 }} }}
tenants:
  - {{ id: t, keys: ["sk-ledger"], limits: {limits} }}
redis: {{ url: "{}", timeout_ms: {timeout_ms} }}
"#,
        redis.url()
    );
    let config = Config::from_yaml(&yaml, |_| None).expect("valid config");
    let limiter = Limiter::new(
        &config,
        runestone::redis_conn::RedisConnection::for_config(&config),
    );
    if let Some(pid_file) = pid_file {
        limiter.redis().unwrap().keep_debts_beside(pid_file);
    }
    let (stop, watch) = tokio::sync::watch::channel(false);
    let maintenance = RedisMaintenance::new(limiter.redis().unwrap());
    tokio::spawn(async move { maintenance.run(watch).await });
    (limiter, stop)
}

fn used(tokens: u64) -> runestone::limits::Settlement {
    runestone::limits::Settlement {
        cache_saved_pusd: None,
        usage: runestone::cost::Usage {
            prompt_tokens: tokens,
            completion_tokens: tokens,
            cached_tokens: 0,
            estimated: false,
            ..Default::default()
        },
        cost_pusd: 1000,
        duration: Duration::from_millis(5),
    }
}

/// Waits, off the runtime (whose tasks are what Redis is answering), until
/// `redis-cli ARGS` prints what `done` accepts; then until the limiter sees
/// Redis up.
async fn wait_for_redis(
    redis: &Redis,
    limiter: &runestone::limits::Limiter,
    what: &'static str,
    args: &[&str],
    done: impl Fn(&str) -> bool + Send + 'static,
) {
    let port = redis.port.to_string();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        wait_until(Duration::from_secs(10), what, || {
            let out = std::process::Command::new("redis-cli")
                .arg("-p")
                .arg(&port)
                .args(&args)
                .output()
                .unwrap();
            done(&String::from_utf8_lossy(&out.stdout))
        })
    })
    .await
    .unwrap();
    wait_until(Duration::from_secs(5), "Redis to be seen up", || {
        limiter.redis().unwrap().is_up()
    });
}

fn usage_requests(redis: &Redis) -> String {
    let keys = redis.cli(&["KEYS", "runestone:{t}:usage:*"]);
    let key = keys.lines().next().unwrap_or_default().to_string();
    redis.cli(&["HGET", &key, "requests"]).trim().to_string()
}

/// The frozen-Redis ledger test's Redis timeout: long enough that its 31
/// settlements before the freeze are answered on a loaded machine, short
/// enough that the frozen one times out soon.
const FROZEN_TIMEOUT_MS: u64 = 1000;

/// #14.8: a settlement whose answer timed out (Redis frozen) is kept and
/// sent again once Redis answers; Redis also runs the original when it
/// thaws. It must count once.
#[test]
fn a_settlement_sent_again_after_a_frozen_redis_counts_once() {
    let redis = Redis::start();
    let runtime = runtime();
    runtime.block_on(async {
        let (limiter, _stop) =
            redis_limiter(&redis, "{ requests_per_minute: 1000 }", FROZEN_TIMEOUT_MS);
        limiter.redis().unwrap().connect().await;
        // 31 batches first: the frozen one is the 32nd, the last bit (the
        // sign bit) of its record's field.
        for _ in 0..31 {
            let grant = limiter.admit(0, 10).await.expect("admitted");
            limiter.settle(grant, used(5)).await;
        }
        assert_eq!(usage_requests(&redis), "31");
        let grant = limiter.admit(0, 10).await.expect("admitted");
        let script_runs = |stats: &str| {
            (stats.lines())
                .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
                .and_then(|rest| rest.split(',').next()?.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let before = script_runs(&redis.cli(&["INFO", "commandstats"]));
        redis.freeze();
        limiter.settle(grant, used(5)).await;
        assert!(
            !limiter.redis().unwrap().is_up(),
            "the settlement timed out"
        );
        // The batching task's own timeout started after the caller's: Redis
        // stays frozen until it has given up on the batch too and kept it
        // for the flush (the usage read while Redis is down counts it).
        // Thawed earlier, Redis answers the batch itself and no copy is sent.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let report = limiter.usage(0).await;
            if report.partial && report.usage.requests == 1 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the unanswered batch was never kept for the flush"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        redis.thaw();
        // The original runs as Redis thaws; the copy follows with the flush
        // (by hash, as the original) and must be recognised.
        wait_for_redis(
            &redis,
            &limiter,
            "the flush to send the copy",
            &["INFO", "commandstats"],
            move |out| script_runs(out) >= before + 2,
        )
        .await;
        let report = limiter.usage(0).await;
        assert!(!report.partial);
        assert_eq!(report.usage.requests, 32, "32 requests settled, each once");
        assert_eq!(report.usage.cost_pusd, 32_000);
    });
    assert_eq!(usage_requests(&redis), "32");
}

/// Redis remembers which settlement batches it applied (so a copy counts
/// once) in one bit each, 32 to a hash field, in a key that expires: a busy
/// tenant's records stay kilobytes, not an entry per batch.
#[test]
fn applied_settlements_are_remembered_a_bit_each_and_expire() {
    let redis = Redis::start();
    let runtime = runtime();
    runtime.block_on(async {
        let (limiter, _stop) = redis_limiter(&redis, "{ requests_per_minute: 100000 }", 5000);
        limiter.redis().unwrap().connect().await;
        for _ in 0..300 {
            let grant = limiter.admit(0, 10).await.expect("admitted");
            limiter.settle(grant, used(1)).await;
        }
    });
    assert_eq!(usage_requests(&redis), "300");
    let keys = redis.cli(&["KEYS", "runestone:{t}:settled:*"]);
    let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
    assert_eq!(keys.len(), 1, "one record key: {keys:?}");
    assert_eq!(redis.cli(&["TYPE", keys[0]]).trim(), "hash");
    let fields: u64 = redis.cli(&["HLEN", keys[0]]).trim().parse().unwrap();
    assert!(fields <= 300 / 32 + 1, "a bit a batch: {fields} fields");
    let ttl: i64 = redis.cli(&["PTTL", keys[0]]).trim().parse().unwrap();
    assert!(ttl > 0 && ttl <= 600_000, "the record expires: {ttl} ms");
}

/// A settlement Redis refuses (here a usage counter an operator overwrote
/// with something HINCRBY would not take) is refused whole: nothing of it
/// is written, Redis is not taken for down, the usage stays owed (and
/// counted), and once the key is mended it is applied once.
#[test]
fn a_settlement_refused_by_redis_is_kept_whole_and_applied_once_later() {
    let redis = Redis::start();
    let runtime = runtime();
    runtime.block_on(async {
        let (limiter, _stop) = redis_limiter(&redis, "{ requests_per_minute: 1000 }", 5000);
        limiter.redis().unwrap().connect().await;
        let grant = limiter.admit(0, 10).await.expect("admitted");
        limiter.settle(grant, used(5)).await;
        assert_eq!(usage_requests(&redis), "1");
        let keys = redis.cli(&["KEYS", "runestone:{t}:usage:*"]);
        let usage_key = keys.lines().next().unwrap().to_string();
        // Text, and a number Redis's own integer parser refuses.
        redis.cli(&["HSET", &usage_key, "prompt_tokens", "not a number"]);
        redis.cli(&["HSET", &usage_key, "completion_tokens", "007"]);
        for _ in 0..3 {
            let grant = limiter.admit(0, 10).await.expect("admitted");
            limiter.settle(grant, used(5)).await;
        }
        assert_eq!(
            usage_requests(&redis),
            "1",
            "nothing of the refused batches was written"
        );
        assert_eq!(redis.cli(&["HGET", &usage_key, "cost_pusd"]).trim(), "1000");
        assert!(
            limiter.redis().unwrap().is_up(),
            "a refusal is an answer, not an outage"
        );
        // What is owed is counted; Redis's own counters cannot be read
        // (one holds text), which the report says.
        let owed = limiter.usage(0).await;
        assert!(owed.partial);
        assert_eq!(owed.usage.requests, 3, "the three refused are owed");
        assert_eq!(owed.usage.cost_pusd, 3000);
        redis.cli(&["HSET", &usage_key, "prompt_tokens", "5"]);
        redis.cli(&["HSET", &usage_key, "completion_tokens", "5"]);
        wait_for_redis(
            &redis,
            &limiter,
            "the kept batch to be applied",
            &["HGET", &usage_key, "requests"],
            |out| out.trim() == "4",
        )
        .await;
        let report = limiter.usage(0).await;
        assert_eq!(report.usage.requests, 4, "applied once");
        assert_eq!(report.usage.cost_pusd, 4000);
    });
    assert_eq!(usage_requests(&redis), "4");
}

/// While Redis refuses a tenant's settlements, what it owes for them counts
/// against the budget of the admissions Redis decides (which see only
/// Redis's own spend), and a counter at the edge of 64 bits is refused,
/// not overflowed after other writes.
#[test]
fn refused_spend_counts_against_the_budget() {
    let redis = Redis::start();
    let runtime = runtime();
    runtime.block_on(async {
        // 3,000 pUSD; each settlement below costs 1,000.
        let (limiter, _stop) = redis_limiter(
            &redis,
            "{ requests_per_minute: 1000, budget_usd: { amount: 0.000000003, period: monthly } }",
            5000,
        );
        limiter.redis().unwrap().connect().await;
        let grant = limiter.admit(0, 10).await.expect("admitted");
        limiter.settle(grant, used(5)).await;
        let keys = redis.cli(&["KEYS", "runestone:{t}:usage:*"]);
        let usage_key = keys.lines().next().unwrap().to_string();
        redis.cli(&[
            "HSET",
            &usage_key,
            "completion_tokens",
            "9223372036854775807",
        ]);
        for _ in 0..2 {
            let grant = limiter.admit(0, 10).await.expect("admitted");
            limiter.settle(grant, used(5)).await;
        }
        assert_eq!(
            redis.cli(&["HGET", &usage_key, "prompt_tokens"]).trim(),
            "5",
            "nothing of the refused batches was written"
        );
        assert!(limiter.redis().unwrap().is_up());
        let refusal = limiter
            .admit(0, 10)
            .await
            .expect_err("1,000 in Redis and 2,000 owed reach the budget");
        assert_eq!(refusal.limit, runestone::limits::LimitKind::Budget);
    });
}

/// #14.4: a grant dropped without settling (its request's task panicked)
/// frees its Redis slot instead of renewing it forever.
#[test]
fn a_grant_dropped_unsettled_releases_its_redis_lease() {
    let redis = Redis::start();
    let runtime = runtime();
    runtime.block_on(async {
        let (limiter, _stop) = redis_limiter(&redis, "{ max_concurrent: 1 }", 5000);
        limiter.redis().unwrap().connect().await;
        let grant = limiter.admit(0, 10).await.expect("admitted");
        assert!(limiter.admit(0, 10).await.is_err(), "the one slot is taken");
        drop(grant);
        let started = std::time::Instant::now();
        loop {
            if let Ok(grant) = limiter.admit(0, 10).await {
                limiter.settle(grant, used(1)).await;
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "the dropped grant's lease was released"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    assert_eq!(redis.cli(&["ZCARD", "runestone:{t}:inflight"]).trim(), "0");
}

/// #14.10: a grant given back unused returns its request and records
/// nothing, in Redis as in process.
#[test]
fn an_unused_grant_is_released_not_settled() {
    let redis = Redis::start();
    let runtime = runtime();
    runtime.block_on(async {
        let (limiter, _stop) = redis_limiter(
            &redis,
            "{ requests_per_minute: 2, max_concurrent: 5 }",
            5000,
        );
        limiter.redis().unwrap().connect().await;
        for _ in 0..5 {
            let grant = limiter
                .admit(0, 10)
                .await
                .expect("released grants give the request back");
            limiter.release(grant).await;
        }
        let a = limiter.admit(0, 10).await.expect("one");
        let b = limiter.admit(0, 10).await.expect("two");
        assert!(
            limiter.admit(0, 10).await.is_err(),
            "the minute's two are taken"
        );
        limiter.settle(a, used(1)).await;
        limiter.settle(b, used(1)).await;
        let report = limiter.usage(0).await;
        assert_eq!(report.usage.requests, 2, "released grants are not requests");
    });
    assert_eq!(redis.cli(&["ZCARD", "runestone:{t}:inflight"]).trim(), "0");
}

/// What one instance admitted on its own while Redis was away still holds
/// its slots and its place in the minute once Redis is back, and the slots
/// Redis gave it count while Redis is away: however Redis comes and goes,
/// one instance never runs more than a limit.
#[test]
fn what_was_admitted_on_either_side_of_a_redis_outage_counts_on_the_other() {
    use runestone::limits::LimitKind;
    let redis = Redis::start();
    let runtime = runtime();
    let leases = || {
        redis
            .cli(&["ZCARD", "runestone:{t}:inflight"])
            .trim()
            .to_string()
    };
    runtime.block_on(async {
        let (limiter, _stop) = redis_limiter(&redis, "{ max_concurrent: 2 }", FROZEN_TIMEOUT_MS);
        limiter.redis().unwrap().connect().await;
        let by_redis = limiter.admit(0, 10).await.expect("admitted by Redis");
        redis.freeze();
        // The first call waits out the timeout and falls back.
        let local = limiter.admit(0, 10).await.expect("admitted in process");
        assert!(!limiter.redis().unwrap().is_up());
        let refused = limiter.admit(0, 10).await.unwrap_err();
        assert_eq!(
            refused.limit,
            LimitKind::Concurrency,
            "Redis's slot counts here"
        );
        limiter.settle(by_redis, used(1)).await;
        redis.thaw();
        // Its lease is released with the flush.
        wait_for_redis(
            &redis,
            &limiter,
            "the flush",
            &["ZCARD", "runestone:{t}:inflight"],
            |out| out.trim() == "0",
        )
        .await;
        let second = limiter.admit(0, 10).await.expect("admitted by Redis");
        assert_eq!(leases(), "1");
        let refused = limiter.admit(0, 10).await.unwrap_err();
        assert_eq!(
            refused.limit,
            LimitKind::Concurrency,
            "the slot taken here counts in Redis"
        );
        limiter.settle(local, used(1)).await;
        let third = limiter.admit(0, 10).await.expect("freed");
        assert_eq!(leases(), "2");
        limiter.settle(second, used(1)).await;
        limiter.settle(third, used(1)).await;
    });
    // The minute: 4 requests, 2 taken in process while Redis was away.
    let redis = Redis::start();
    runtime.block_on(async {
        let (limiter, _stop) =
            redis_limiter(&redis, "{ requests_per_minute: 4 }", FROZEN_TIMEOUT_MS);
        limiter.redis().unwrap().connect().await;
        redis.freeze();
        for _ in 0..2 {
            let grant = limiter.admit(0, 10).await.expect("admitted in process");
            limiter.settle(grant, used(1)).await;
        }
        redis.thaw();
        wait_for_redis(&redis, &limiter, "Redis to answer", &["PING"], |out| {
            out.contains("PONG")
        })
        .await;
        for _ in 0..2 {
            let grant = limiter.admit(0, 10).await.expect("admitted by Redis");
            limiter.settle(grant, used(1)).await;
        }
        let refused = limiter.admit(0, 10).await.unwrap_err();
        assert_eq!(
            refused.limit,
            LimitKind::Requests,
            "4 in the minute, whoever admitted them"
        );
    });
}

/// The spend of a settlement Redis applied counts at once in what the
/// instance knows of it, not only from the next admission's read: a Redis
/// that stops answering in between does not let one more request past a
/// spent budget.
#[test]
fn a_budget_spent_just_before_redis_stops_answering_stays_spent() {
    use runestone::limits::LimitKind;
    let redis = Redis::start();
    let runtime = runtime();
    runtime.block_on(async {
        // 3,000 pUSD; each settlement below spends 1,000.
        let (limiter, _stop) = redis_limiter(
            &redis,
            "{ budget_usd: { amount: 0.000000003, period: daily } }",
            FROZEN_TIMEOUT_MS,
        );
        limiter.redis().unwrap().connect().await;
        for _ in 0..2 {
            let grant = limiter.admit(0, 10).await.expect("admitted by Redis");
            limiter.settle(grant, used(1)).await;
        }
        redis.freeze();
        // The one that crosses the budget, then no more.
        let grant = limiter.admit(0, 10).await.expect("admitted in process");
        assert!(!limiter.redis().unwrap().is_up());
        limiter.settle(grant, used(1)).await;
        let refused = limiter.admit(0, 10).await.unwrap_err();
        assert_eq!(refused.limit, LimitKind::Budget);
        redis.thaw();
    });
}

/// What a reload hands the new process fits in one environment string,
/// however many tenants have budgets: those nearest their budgets first.
#[test]
fn the_spend_handed_over_at_a_reload_is_bounded_nearest_budgets_first() {
    use runestone::config::Config;
    use runestone::limits::{Limiter, HANDOVER_BYTES};
    let tenants: String = (0..4000)
        .map(|i| format!("  - {{ id: tenant-{i:05}, keys: [\"sk-t{i:05}\"], limits: {{ budget_usd: {{ amount: 1, period: monthly }} }} }}\n"))
        .collect();
    let yaml = format!(
        "server: {{ listen: \"127.0.0.1:1\" }}\nproviders: [{{ name: p, base_url: \"http://127.0.0.1:1/v1\" }}]\nmodels: [{{ name: m, targets: [{{ provider: p }}] }}]\ntenants:\n{tenants}redis: {{ url: \"redis://127.0.0.1:{}/0\" }}\n",
        free_port()
    );
    let config = Config::from_yaml(&yaml, |_| None).expect("valid config");
    let limiter = || {
        Limiter::new(
            &config,
            runestone::redis_conn::RedisConnection::for_config(&config),
        )
    };
    let period = this_month();
    let spends: Vec<(String, String, i64)> = (0..4000)
        .map(|i| {
            (
                format!("tenant-{i:05}"),
                period.clone(),
                1_000_000 * (i + 1),
            )
        })
        .collect();
    let old = limiter();
    old.count_handed_over(&serde_json::to_string(&spends).unwrap());
    let handed = old.handover();
    assert!(handed.len() <= HANDOVER_BYTES, "{}", handed.len());
    let kept: Vec<(String, String, i64)> = serde_json::from_str(&handed).unwrap();
    assert!(kept.len() > 1000 && kept.len() < 4000, "{}", kept.len());
    assert_eq!(kept[0], spends[3999], "the nearest its budget first");
    assert!(kept.windows(2).all(|w| w[0].2 >= w[1].2));
    // Read back by a new process, it hands over the same.
    let new = limiter();
    new.count_handed_over(&handed);
    assert_eq!(new.handover(), handed);
}

/// This month's period id (`2026-12`), as the gateway names it.
fn this_month() -> String {
    let (period, _) = runestone::limits::period_at(
        runestone::config::BudgetPeriod::Monthly,
        runestone::limits::now_ms(),
    );
    period.to_string()
}

/// An outage longer than a lease's TTL lets Redis expire the leases of
/// requests still running here (its clock runs on while it is frozen):
/// they are put back before the tenant counts as up, so their slots are not
/// given out twice.
#[test]
fn leases_redis_let_expire_in_an_outage_are_put_back_before_it_counts_again() {
    use runestone::limits::LimitKind;
    let redis = Redis::start();
    let runtime = runtime();
    let inflight = "runestone:{t}:inflight";
    runtime.block_on(async {
        let (limiter, _stop) = redis_limiter(&redis, "{ max_concurrent: 2 }", FROZEN_TIMEOUT_MS);
        limiter.redis().unwrap().connect().await;
        let held = limiter.admit(0, 10).await.expect("admitted by Redis");
        // The lease ends in 500 ms of Redis's time, as if its renewals had
        // been missed: gone by the time Redis answers again.
        let lease = redis.cli(&["ZRANGE", inflight, "0", "-1"]);
        let time = redis.cli(&["TIME"]);
        let now_ms = time.lines().next().unwrap().trim().parse::<u64>().unwrap() * 1000;
        let soon = (now_ms + 500).to_string();
        redis.cli(&["ZADD", inflight, "XX", &soon, lease.trim()]);
        redis.freeze();
        // Down after the timeout (1 s): the in-process slot is the second.
        let local = limiter.admit(0, 10).await.expect("admitted in process");
        assert!(!limiter.redis().unwrap().is_up());
        redis.thaw();
        wait_for_redis(&redis, &limiter, "Redis to answer", &["PING"], |out| {
            out.contains("PONG")
        })
        .await;
        let refused = limiter.admit(0, 10).await.unwrap_err();
        assert_eq!(
            refused.limit,
            LimitKind::Concurrency,
            "the lease Redis lost counts again"
        );
        assert_eq!(redis.cli(&["ZCARD", inflight]).trim(), "1");
        limiter.settle(held, used(1)).await;
        limiter.settle(local, used(1)).await;
    });
}

/// A gateway stopping while Redis does not answer pays what it owes Redis
/// if Redis answers before the process ends (its grace period), rather
/// than trying once and losing it.
#[test]
fn usage_owed_to_redis_is_paid_while_the_gateway_stops() {
    let redis = Redis::start();
    let mock = Mock::start(&[]);
    let mut config = limited_within(&mock, "{ requests_per_minute: 1000 }", Some(&redis), 300);
    config.grace = 10;
    let mut gw = Gateway::start(&config);
    let ask = || {
        gw.post_json(
            "/v1/chat/completions",
            TENANT_KEY,
            &chat("gpt-4o-mini", false),
        )
    };
    for _ in 0..2 {
        assert_eq!(ask().status, 200);
    }
    redis.freeze();
    for _ in 0..3 {
        assert_eq!(ask().status, 200, "served in process");
    }
    signal(gw.pid(), "TERM");
    wait_until(
        Duration::from_secs(10),
        "the gateway to say it owes Redis",
        || gw.log().contains("stopping while Redis does not answer"),
    );
    redis.thaw();
    assert_eq!(gw.wait_exit(Duration::from_secs(30)), Some(0));
    assert!(
        gw.log().contains("paid Redis what was owed"),
        "{}",
        gw.log()
    );
    let keys = redis.cli(&["KEYS", "runestone:{acme}:usage:*"]);
    let key = keys.lines().next().unwrap().trim().to_string();
    assert_eq!(
        redis.cli(&["HGET", &key, "requests"]).trim(),
        "5",
        "every request billed once"
    );
}

/// The debt files beside a gateway's pid file (`gw.pid.owed.<pid>.<random>`).
fn debt_files(gw: &Gateway) -> Vec<std::path::PathBuf> {
    debt_files_in(&gw.config_path().1)
}

/// The status of one chat request of the tenant's.
fn ask(gw: &Gateway) -> u16 {
    let body = chat("gpt-4o-mini", false);
    gw.post_json("/v1/chat/completions", TENANT_KEY, &body)
        .status
}

/// The tenant's requests in Redis this month.
fn requests_in_redis(redis: &Redis) -> String {
    let key = format!("runestone:{{acme}}:usage:{}", this_month());
    redis.cli(&["HGET", &key, "requests"]).trim().to_string()
}

/// A gateway that ends while Redis does not answer (stopped after its grace
/// period, or killed) leaves what it owes Redis beside its pid file, kept
/// current while it owes: the next gateway on the pid file pays it once
/// Redis answers, every request billed once.
#[test]
fn usage_owed_when_a_gateway_ends_during_an_outage_is_paid_by_the_next_one() {
    let redis = Redis::start();
    let mock = Mock::start(&[]);
    let mut config = limited_within(&mock, "{ requests_per_minute: 1000 }", Some(&redis), 300);
    config.grace = 1;
    let mut gw = Gateway::start(&config);
    for (ending, before) in [("TERM", 0), ("KILL", 5)] {
        assert_eq!(ask(&gw), 200);
        wait_until(Duration::from_secs(5), "Redis to count it", || {
            requests_in_redis(&redis) == (before + 1).to_string()
        });
        redis.freeze();
        for _ in 0..3 {
            assert_eq!(ask(&gw), 200, "served in process");
        }
        // Written down while owed, before the process ends.
        wait_until(Duration::from_secs(5), "the debt written down", || {
            requests_owed_beside(&gw.config_path().1) == 3
        });
        signal(gw.pid(), ending);
        gw.wait_exit(Duration::from_secs(20));
        redis.thaw();
        assert_eq!(
            requests_in_redis(&redis),
            (before + 1).to_string(),
            "not paid by the process that ended ({ending})"
        );
        assert_eq!(debt_files(&gw).len(), 1);
        gw.start_again(&config);
        wait_until(Duration::from_secs(10), "the debt paid", || {
            requests_in_redis(&redis) == (before + 4).to_string()
        });
        wait_until(Duration::from_secs(5), "its file removed", || {
            debt_files(&gw).is_empty()
        });
        assert!(
            gw.log()
                .contains("took over what ended processes owed Redis"),
            "{}",
            gw.log()
        );
        assert_eq!(ask(&gw), 200);
        wait_until(
            Duration::from_secs(5),
            "the next request counted once",
            || requests_in_redis(&redis) == (before + 5).to_string(),
        );
    }
}

/// A debt file whose batches Redis already applied (the process that wrote
/// it paid them, or Redis ran them before their answers were lost) is paid
/// again as it was written: Redis counts each batch once.
#[test]
fn a_debt_paid_already_is_not_counted_twice() {
    let redis = Redis::start();
    let mock = Mock::start(&[]);
    let mut config = limited_within(&mock, "{ requests_per_minute: 1000 }", Some(&redis), 300);
    config.grace = 10;
    let mut gw = Gateway::start(&config);
    assert_eq!(ask(&gw), 200);
    redis.freeze();
    for _ in 0..3 {
        assert_eq!(ask(&gw), 200, "served in process");
    }
    wait_until(Duration::from_secs(5), "the debt written down", || {
        debt_files(&gw).first().map(|f| requests_owed_in(f)) == Some(3)
    });
    let file = debt_files(&gw).remove(0);
    let copy = std::fs::read(&file).unwrap();
    let pid = gw.pid();
    signal(pid, "TERM");
    redis.thaw();
    assert_eq!(gw.wait_exit(Duration::from_secs(30)), Some(0));
    assert_eq!(requests_in_redis(&redis), "4", "paid while stopping");
    assert!(debt_files(&gw).is_empty(), "removed once paid");
    // The file as it was before the payment, left as if the answer had
    // been lost.
    std::fs::write(&file, &copy).unwrap();
    gw.start_again(&config);
    wait_until(Duration::from_secs(10), "the copy taken and sent", || {
        debt_files(&gw).is_empty() && gw.log().contains("debts_of_ended_processes=1")
    });
    assert_eq!(requests_in_redis(&redis), "4", "each batch counted once");
}

/// What is owed is written down as it comes to be owed, not when a call
/// to a Redis that does not answer gives up (its timeout, here 5 s): a
/// gateway killed a moment after serving leaves it.
#[test]
fn usage_owed_is_written_down_at_once_whatever_redis_keeps_waiting() {
    let redis = Redis::start();
    let mock = Mock::start(&[]);
    let config = limited_within(&mock, "{ requests_per_minute: 1000 }", Some(&redis), 5000);
    let mut gw = Gateway::start(&config);
    redis.freeze();
    for _ in 0..3 {
        assert_eq!(ask(&gw), 200, "served in process");
    }
    wait_until(Duration::from_secs(2), "the debt written down", || {
        requests_owed_beside(&gw.config_path().1) == 3
    });
    signal(gw.pid(), "KILL");
    gw.wait_exit(Duration::from_secs(10));
    redis.thaw();
    gw.start_again(&config);
    wait_until(Duration::from_secs(10), "the debt paid", || {
        requests_in_redis(&redis) == "3"
    });
}

/// What is owed when the process ends (its runtime stopped at the end of a
/// grace period, its tasks dropped) is written down then, however lately
/// it came to be owed.
#[test]
fn usage_owed_is_written_down_as_the_process_ends() {
    let redis = Redis::start();
    let dir = std::env::temp_dir().join(format!(
        "runestone-debts-{}-{}",
        std::process::id(),
        runestone::ids::random_token()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let pid_file = dir.join("gw.pid").display().to_string();
    redis.freeze();
    let runtime = runtime();
    runtime.block_on(async {
        let (limiter, _stop) = redis_limiter_keeping_debts(
            &redis,
            "{ requests_per_minute: 1000 }",
            FROZEN_TIMEOUT_MS,
            Some(&pid_file),
        );
        // Down until Redis first answers: admitted in process at once.
        let grant = limiter.admit(0, 10).await.expect("admitted in process");
        limiter.settle(grant, used(1)).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while requests_owed_beside(&dir) != 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "the first written down"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The second while the writing rests after the first.
        let grant = limiter.admit(0, 10).await.expect("admitted in process");
        limiter.settle(grant, used(1)).await;
    });
    drop(runtime);
    assert_eq!(requests_owed_beside(&dir), 2, "every request written down");
    redis.thaw();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A gateway started without `redis:` beside the debt file an earlier
/// process left says that only one with Redis pays it, and leaves it.
#[test]
fn debts_left_for_redis_are_named_by_a_gateway_without_it() {
    let redis = Redis::start();
    let mock = Mock::start(&[]);
    let config = limited_within(&mock, "{ requests_per_minute: 1000 }", Some(&redis), 300);
    let mut gw = Gateway::start(&config);
    redis.freeze();
    assert_eq!(ask(&gw), 200, "served in process");
    wait_until(Duration::from_secs(5), "the debt written down", || {
        debt_files(&gw).len() == 1
    });
    signal(gw.pid(), "KILL");
    gw.wait_exit(Duration::from_secs(10));
    redis.thaw();
    let without = limited_within(&mock, "{ requests_per_minute: 1000 }", None, 300);
    let (path, dir) = gw.config_path();
    std::fs::write(path, without.yaml_in(&dir)).unwrap();
    gw.start_again(&without);
    assert!(
        gw.log()
            .contains("only a gateway with redis: configured pays it"),
        "{}",
        gw.log()
    );
    assert_eq!(debt_files(&gw).len(), 1, "left for one");
}
