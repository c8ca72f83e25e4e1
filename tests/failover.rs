//! Failover through real processes, with the configuration users write
//! most: one provider account serving several models that fall back to
//! each other. Each scenario checks what the client got, how many attempts
//! each deployment saw (and when), and what was billed.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const CHAT: &str = "/v1/chat/completions";

/// USD per 1M tokens, (input, output), per public model.
const SMALL_PRICE: (f64, f64) = (1.0, 2.0);
const LARGE_PRICE: (f64, f64) = (10.0, 20.0);

/// One provider `acct` (one mock) serving `small` (falls back to `large`,
/// and to `large` for a prompt too long), `large` (falls back to `small`)
/// and `solo` (no fallback). `provider_extra` goes into the provider's
/// flow mapping, `extra` at the top level.
fn config(mock: &Mock, provider_extra: &str, extra: &str) -> GatewayConfig {
    let mut config = GatewayConfig::new(mock);
    config.providers = vec![format!(
        "  - {{ name: acct, kind: openai, base_url: \"{}\", api_key: \"{PROVIDER_KEY}\", supports_prefill: true, timeouts: {{ first_byte_ms: 1000, first_token_ms: 1000, idle_ms: 500 }}{provider_extra} }}",
        mock.base_url()
    )];
    config.models = "
  - name: small
    targets: [{ provider: acct, model: m-small }]
    fallbacks: [large]
    context_fallbacks: [large]
  - name: large
    targets: [{ provider: acct, model: m-large }]
    fallbacks: [small]
  - name: solo
    targets: [{ provider: acct, model: m-solo }]
"
    .into();
    config.tenants = format!("\n  - id: acme\n    keys: [\"{TENANT_KEY}\"]\n");
    config.extra = format!(
        "pricing:\n  small: {{ input: {}, output: {} }}\n  large: {{ input: {}, output: {} }}\n  solo: {{ input: 1, output: 2 }}\n{extra}",
        SMALL_PRICE.0, SMALL_PRICE.1, LARGE_PRICE.0, LARGE_PRICE.1
    );
    config
}

fn start(provider_extra: &str, extra: &str) -> (Mock, Gateway) {
    let mock = Mock::start(&[]);
    let gw = Gateway::start(&config(&mock, provider_extra, extra));
    (mock, gw)
}

/// As [`start`], with `small`'s streams not resumed (`resume_streams: false`).
fn start_unresumed() -> (Mock, Gateway) {
    let mock = Mock::start(&[]);
    let mut config = config(&mock, "", "");
    config.models = config.models.replace(
        "context_fallbacks: [large]",
        "context_fallbacks: [large]\n    resume_streams: false",
    );
    let gw = Gateway::start(&config);
    (mock, gw)
}

/// The chat requests the provider saw for `model`, oldest first.
fn seen(mock: &Mock, model: &str) -> Vec<Value> {
    mock.requests()
        .into_iter()
        .filter(|r| r["model"] == model)
        .collect()
}

/// How many requests the provider saw for `model`.
fn attempts(mock: &Mock, model: &str) -> u64 {
    mock.stats()["by_model"][model].as_u64().unwrap_or(0)
}

fn ask(gw: &Gateway, model: &str) -> Response {
    gw.post_json(CHAT, TENANT_KEY, &chat(model, false))
}

/// What the gateway billed so far: prompt tokens, completion tokens, USD.
fn billed(gw: &Gateway) -> (u64, u64, f64) {
    let metrics = gw.metrics();
    (
        metric_sum(&metrics, "runestone_tokens_total", &["kind=\"prompt\""]) as u64,
        metric_sum(&metrics, "runestone_tokens_total", &["kind=\"completion\""]) as u64,
        metric_sum(&metrics, "runestone_cost_usd_total", &[]),
    )
}

/// The cost of `usage` (an OpenAI usage object) at `price`.
fn cost(usage: &Value, price: (f64, f64)) -> f64 {
    let n = |f: &str| usage[f].as_u64().unwrap() as f64;
    (n("prompt_tokens") * price.0 + n("completion_tokens") * price.1) / 1e6
}

/// Checks a non-streamed answer was billed exactly: its usage, at `price`.
fn assert_billed(gw: &Gateway, answer: &Value, price: (f64, f64)) {
    let usage = &answer["usage"];
    let (prompt, completion, usd) = billed(gw);
    assert_eq!(
        (prompt, completion),
        (
            usage["prompt_tokens"].as_u64().unwrap(),
            usage["completion_tokens"].as_u64().unwrap()
        ),
        "billed what the answer used"
    );
    assert!(
        (usd - cost(usage, price)).abs() < 1e-12,
        "{usd} != {}",
        cost(usage, price)
    );
}

/// The text the mock generates for `n` tokens.
fn mock_text(n: u64) -> String {
    (0..n).map(|i| format!("tok{i} ")).collect()
}

/// Streams a chat for `model` (`n` tokens, usage asked for); the data
/// payloads.
fn stream(gw: &Gateway, model: &str, n: u64) -> Vec<String> {
    let mut body = chat(model, true);
    body["mock_tokens"] = json!(n);
    body["stream_options"] = json!({"include_usage": true});
    let mut events = Vec::new();
    let status = read_sse(gw.port, TENANT_KEY, &body, |data, _| {
        events.push(data.to_owned())
    });
    assert_eq!(status, 200);
    events
}

/// Checks `events` make one whole stream (one `id`, `created` and `model`
/// in every chunk, one role event, one `finish_reason`, one usage chunk,
/// one `[DONE]` and it last); returns its text and usage.
fn whole_stream(events: &[String]) -> (String, Value) {
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    assert_eq!(events.iter().filter(|e| *e == "[DONE]").count(), 1);
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap_or_else(|_| panic!("not JSON: {e}")))
        .collect();
    for field in ["id", "created", "model"] {
        assert!(
            chunks.iter().all(|c| c[field] == chunks[0][field]),
            "one {field}: {events:?}"
        );
    }
    let choice = |c: &Value| c["choices"].get(0).cloned().unwrap_or(Value::Null);
    let count = |f: &dyn Fn(&Value) -> bool| chunks.iter().filter(|c| f(c)).count();
    assert_eq!(
        count(&|c| choice(c)["delta"]["role"].is_string()),
        1,
        "{events:?}"
    );
    assert_eq!(
        count(&|c| !choice(c)["finish_reason"].is_null()),
        1,
        "{events:?}"
    );
    assert_eq!(count(&|c| c["usage"].is_object()), 1, "{events:?}");
    assert!(
        chunks.iter().all(|c| c.get("error").is_none()),
        "{events:?}"
    );
    let text = chunks
        .iter()
        .filter_map(|c| choice(c)["delta"]["content"].as_str().map(str::to_owned))
        .collect();
    let usage = chunks.iter().find(|c| c["usage"].is_object()).unwrap()["usage"].clone();
    (text, usage)
}

/// Waits for `n` access log lines of API requests (not the readiness
/// checks) and returns them.
fn access_lines(gw: &Gateway, n: usize) -> Vec<Value> {
    let lines = || -> Vec<Value> {
        gw.log()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|l| {
                l["type"] == "access" && l["endpoint"] != "ready" && l["endpoint"] != "health"
            })
            .collect()
    };
    wait_until(Duration::from_secs(5), "access log lines", || {
        lines().len() >= n
    });
    lines()
}

#[test]
fn a_fallback_on_the_same_provider_is_tried_and_the_others_keep_serving() {
    let (mock, gw) = start("", "");
    mock.fault(json!({"status": 500, "count": 2, "model": "m-small"}));
    let resp = ask(&gw, "small");
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    assert_eq!(resp.header("x-runestone-attempts"), Some("3"));
    let answer = resp.json();
    assert_eq!(answer["model"], "m-large");
    assert_eq!(
        (attempts(&mock, "m-small"), attempts(&mock, "m-large")),
        (2, 1),
        "the 500 once more on the same deployment, then the fallback"
    );
    assert_billed(&gw, &answer, LARGE_PRICE);
    // One deployment's failures leave the others alone.
    for model in ["large", "solo", "small"] {
        let resp = ask(&gw, model);
        assert_eq!(resp.status, 200, "{model}");
        assert_eq!(resp.header("x-runestone-attempts"), Some("1"), "{model}");
    }
}

#[test]
fn a_provider_429_cools_down_only_its_deployment_for_the_time_it_asked() {
    let (mock, gw) = start("", "");
    // The wait is long beside the requests made during it (a slow machine
    // must not see it end mid-loop), short beside the default 5 s.
    mock.fault(json!({"status": 429, "retry_after_ms": 1500, "model": "m-small"}));
    let started = Instant::now();
    let resp = ask(&gw, "small");
    assert_eq!(
        (resp.status, resp.json()["model"].clone()),
        (200, json!("m-large"))
    );
    // While m-small cools down: small is served by large without trying
    // m-small, and nothing else is affected.
    let mut cooled = 0;
    while started.elapsed() < Duration::from_millis(800) {
        let resp = ask(&gw, "small");
        assert_eq!(resp.status, 200);
        assert_eq!(resp.json()["model"], "m-large");
        assert_eq!(ask(&gw, "solo").status, 200);
        cooled += 1;
    }
    assert!(cooled > 0);
    assert_eq!(
        attempts(&mock, "m-small"),
        1,
        "not tried while cooling down"
    );
    // Back after the provider's wait, not the configured default (5 s).
    wait_until(Duration::from_secs(3), "m-small to serve again", || {
        ask(&gw, "small").json()["model"] == "m-small"
    });
    let back = started.elapsed();
    assert!(
        (Duration::from_millis(1450)..Duration::from_millis(4000)).contains(&back),
        "served again after {back:?}"
    );
}

#[test]
fn a_short_provider_wait_is_waited_out_when_nothing_else_can_serve() {
    let (mock, gw) = start("", "");
    mock.fault(json!({"status": 429, "retry_after_ms": 300, "model": "m-solo"}));
    let started = Instant::now();
    let resp = ask(&gw, "solo");
    let took = started.elapsed();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("x-runestone-attempts"), Some("2"));
    let seen = seen(&mock, "m-solo");
    assert_eq!(seen.len(), 2);
    let gap = seen[1]["at_ms"].as_u64().unwrap() - seen[0]["at_ms"].as_u64().unwrap();
    assert!((280..1000).contains(&gap), "retried after {gap} ms");
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert_billed(&gw, &resp.json(), (1.0, 2.0));
}

#[test]
fn a_provider_429_without_a_wait_cools_down_for_the_default_and_is_answered_when_longer_than_allowed(
) {
    let (mock, gw) = start("", "");
    let body = r#"{"error":{"message":"slow down","type":"rate_limit_error","code":"rate_limit_exceeded"}}"#;
    mock.fault(json!({"status": 429, "error_body": body, "content_type": "application/json", "model": "m-solo"}));
    let started = Instant::now();
    let resp = ask(&gw, "solo");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the default 5 s is not waited"
    );
    assert_eq!(
        (resp.status, resp.error_code()),
        (429, "upstream_rate_limited".to_string())
    );
    let wait: u64 = resp.header("retry-after-ms").unwrap().parse().unwrap();
    assert!((4000..=5000).contains(&wait), "{wait}");
    assert_eq!(attempts(&mock, "m-solo"), 1);
    // The deployment rests for the default cool-down: answered at once.
    let resp = ask(&gw, "solo");
    assert_eq!(resp.status, 503);
    assert_eq!(attempts(&mock, "m-solo"), 1);
    assert_eq!(ask(&gw, "large").status, 200, "other deployments serve");
    assert_eq!(billed(&gw).0, 7, "only the served request is billed");
}

#[test]
fn a_500_once_is_retried_on_the_same_deployment() {
    let (mock, gw) = start("", "");
    mock.fault(json!({"status": 500, "model": "m-small"}));
    let resp = ask(&gw, "small");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("x-runestone-attempts"), Some("2"));
    assert_eq!(resp.json()["model"], "m-small");
    let seen = seen(&mock, "m-small");
    assert_eq!((seen.len(), attempts(&mock, "m-large")), (2, 0));
    let gap = seen[1]["at_ms"].as_u64().unwrap() - seen[0]["at_ms"].as_u64().unwrap();
    assert!(gap < 500, "a short jittered pause, not {gap} ms");
    assert_billed(&gw, &resp.json(), SMALL_PRICE);
}

#[test]
fn a_persistent_503_is_not_hammered() {
    let (mock, gw) = start("", "circuit_breaker: { consecutive_failures: 3 }\n");
    mock.fault(json!({"status": 503, "count": 1000, "model": "m-small"}));
    for _ in 0..12 {
        let resp = ask(&gw, "small");
        assert_eq!(resp.status, 200);
        assert_eq!(resp.json()["model"], "m-large");
    }
    assert_eq!(
        attempts(&mock, "m-small"),
        3,
        "the breaker opens after 3 failures (one request's retry included)"
    );
    assert_eq!(attempts(&mock, "m-large"), 12);
}

#[test]
fn a_reset_before_the_headers_is_retried_once_on_the_same_deployment() {
    let (mock, gw) = start("", "");
    mock.fault(json!({"drop_connection": true, "model": "m-small"}));
    let resp = ask(&gw, "small");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json()["model"], "m-small");
    assert_eq!(attempts(&mock, "m-small"), 2);
    assert_billed(&gw, &resp.json(), SMALL_PRICE);
}

#[test]
fn a_provider_that_never_answers_fails_over_after_first_byte_ms() {
    let (mock, gw) = start("", "");
    mock.fault(json!({"stall_ms": 10000, "model": "m-small"}));
    let started = Instant::now();
    let resp = ask(&gw, "small");
    let took = started.elapsed();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json()["model"], "m-large");
    assert!(
        (Duration::from_millis(900)..Duration::from_secs(3)).contains(&took),
        "{took:?}"
    );
    assert_eq!(
        (attempts(&mock, "m-small"), attempts(&mock, "m-large")),
        (1, 1)
    );
    assert_billed(&gw, &resp.json(), LARGE_PRICE);
}

#[test]
fn headers_at_once_and_the_first_token_late_fail_over_with_nothing_sent() {
    let (mock, gw) = start("", "");
    mock.fault(json!({"first_token_ms": 5000, "model": "m-small"}));
    let started = Instant::now();
    let events = stream(&gw, "small", 6);
    let took = started.elapsed();
    let (text, usage) = whole_stream(&events);
    assert_eq!(text, mock_text(6));
    assert!(
        (Duration::from_millis(900)..Duration::from_secs(3)).contains(&took),
        "failed over at the first-token deadline: {took:?}"
    );
    assert!(events[0].contains("m-large"), "{}", events[0]);
    assert_eq!(
        (attempts(&mock, "m-small"), attempts(&mock, "m-large")),
        (1, 1)
    );
    let (prompt, completion, _) = billed(&gw);
    assert_eq!(
        (prompt, completion),
        (
            usage["prompt_tokens"].as_u64().unwrap(),
            usage["completion_tokens"].as_u64().unwrap()
        )
    );
}

/// A stream broken on `m-small` after three tokens is finished by `large`:
/// one whole stream, the text exactly once, both attempts billed and the
/// usage chunk saying so.
fn assert_resumed(gw: &Gateway, mock: &Mock, events: &[String], continuations: usize) {
    let (text, usage) = whole_stream(events);
    assert_eq!(text, mock_text(10), "the whole text, exactly once");
    assert!(
        events[0].contains("m-small"),
        "the first attempt's model throughout"
    );
    assert_eq!(attempts(mock, "m-small"), 1);
    assert_eq!(seen(mock, "m-large").len(), continuations);
    let (prompt, completion, usd) = billed(gw);
    assert_eq!(
        (prompt, completion),
        (
            usage["prompt_tokens"].as_u64().unwrap(),
            usage["completion_tokens"].as_u64().unwrap()
        ),
        "the usage chunk is what was billed"
    );
    assert!(completion > 10 - 3, "both attempts billed: {usage}");
    assert!(usd > 0.0);
    let line = access_lines(gw, 1).pop().unwrap();
    assert_eq!(line["resumptions"], 1);
    assert_eq!(line["completion_tokens"].as_u64(), Some(completion));
    let metrics = gw.metrics();
    assert_eq!(
        metric_value(
            &metrics,
            r#"runestone_stream_resumptions_total{model="small",outcome="resumed"}"#
        ),
        1.0
    );
    // Each attempt's tokens under its own model: what `small` generated
    // before the break is not `large`'s.
    let completion_of = |model: &str| {
        metric_sum(
            &metrics,
            "runestone_tokens_total",
            &[&format!("model=\"{model}\""), "kind=\"completion\""],
        )
    };
    let (small, large) = (completion_of("small"), completion_of("large"));
    assert!(small >= 3.0 && large >= 1.0, "small {small}, large {large}");
    assert_eq!(small + large, completion as f64);
    assert_eq!(
        metric_sum(&metrics, "runestone_errors_total", &[]),
        0.0,
        "the client saw no error"
    );
}

#[test]
fn a_stream_cut_mid_answer_is_finished_by_the_fallback() {
    let (mock, gw) = start("", "");
    mock.fault(json!({"disconnect_after_chunks": 3, "model": "m-small"}));
    let events = stream(&gw, "small", 10);
    assert_resumed(&gw, &mock, &events, 1);
    let continuation = &seen(&mock, "m-large")[0];
    assert_eq!(
        continuation["prefilled"], true,
        "continued from the text delivered"
    );
}

#[test]
fn a_stalled_stream_is_finished_by_the_fallback() {
    let (mock, gw) = start("", "");
    mock.fault(json!({"stall_after_chunks": 3, "stall_ms": 10000, "model": "m-small"}));
    let started = Instant::now();
    let events = stream(&gw, "small", 10);
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_resumed(&gw, &mock, &events, 1);
}

#[test]
fn a_fallback_that_rejects_the_prefill_restarts_and_the_repeat_is_skipped() {
    let (mock, gw) = start("", "");
    mock.fault(json!([
        {"disconnect_after_chunks": 3, "model": "m-small"},
        {"reject_prefill": true, "model": "m-large"}
    ]));
    let events = stream(&gw, "small", 10);
    assert_resumed(&gw, &mock, &events, 2);
    let tries = seen(&mock, "m-large");
    assert_eq!(
        (tries[0]["prefilled"].clone(), tries[1]["prefilled"].clone()),
        (json!(true), json!(false)),
        "with the prefill, then from the beginning"
    );
}

#[test]
fn a_provider_without_prefill_restarts_and_the_repeat_is_skipped() {
    let mock = Mock::start(&[]);
    let mut config = config(&mock, "", "");
    config.providers[0] =
        config.providers[0].replace("supports_prefill: true", "supports_prefill: false");
    let gw = Gateway::start(&config);
    mock.fault(json!({"disconnect_after_chunks": 4, "model": "m-small"}));
    let events = stream(&gw, "small", 10);
    let (text, _) = whole_stream(&events);
    assert_eq!(text, mock_text(10));
    assert_eq!(seen(&mock, "m-large")[0]["prefilled"], false);
}

#[test]
fn a_stream_that_cannot_be_resumed_ends_with_an_in_band_error() {
    // solo has no fallback: the break reaches the client in-band.
    let (mock, gw) = start("", "");
    mock.fault(json!({"disconnect_after_chunks": 3, "count": 2, "model": "m-solo"}));
    let events = stream(&gw, "solo", 10);
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_error", "{events:?}");
    assert!(!events.iter().any(|e| e == "[DONE]"));
    assert_eq!(
        attempts(&mock, "m-solo"),
        1,
        "a broken deployment is not asked to continue"
    );
    wait_until(Duration::from_secs(5), "the break to be counted", || {
        metric_value(
            &gw.metrics(),
            r#"runestone_errors_total{reason="provider_stream_broken"}"#,
        ) == 1.0
    });
    assert!(billed(&gw).1 > 0, "what was delivered is billed");
    // Turned off for a model: no continuation.
    let (mock, gw) = start_unresumed();
    mock.fault(json!({"disconnect_after_chunks": 3, "model": "m-small"}));
    let events = stream(&gw, "small", 10);
    assert!(events.last().unwrap().contains("upstream_error"));
    assert_eq!(attempts(&mock, "m-large"), 0);
}

#[test]
fn a_malformed_event_breaks_a_resumable_stream_and_is_left_out_of_others() {
    // It may have carried text: a stream that can go on elsewhere does.
    let (mock, gw) = start("", "");
    mock.fault(json!({"malformed_after_chunks": 2, "model": "m-small"}));
    let events = stream(&gw, "small", 6);
    let (text, usage) = whole_stream(&events);
    assert_eq!(text, mock_text(6));
    assert_eq!(billed(&gw).1, usage["completion_tokens"].as_u64().unwrap());
    assert_eq!(seen(&mock, "m-large").len(), 1);
    // Not resumable: left out, and the stream goes on.
    let (mock, gw) = start_unresumed();
    mock.fault(json!({"malformed_after_chunks": 2, "model": "m-small"}));
    let events = stream(&gw, "small", 6);
    let (text, usage) = whole_stream(&events);
    assert_eq!(text, mock_text(6));
    assert_eq!(usage["completion_tokens"], 6, "the provider's own count");
    assert_eq!(billed(&gw).1, 6);
    assert_eq!(attempts(&mock, "m-large"), 0);
}

#[test]
fn a_malformed_event_is_judged_alike_however_the_stream_was_read() {
    // The same events as the mock's `malformed_after_chunks`, in one write:
    // the first read holds the first content and the event after it.
    let event = |delta: Value, finish: Value| {
        let chunk = json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
            "model": "m-small", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        format!("data: {chunk}\n\n")
    };
    let body = |events: &[&str]| {
        let mut body: String = events.concat();
        body.push_str("data: [DONE]\n\n");
        json!({"status": 200, "content_type": "text/event-stream", "error_body": body, "model": "m-small"})
    };
    let first = event(
        json!({"role": "assistant", "content": "tok0 "}),
        Value::Null,
    );
    let second = event(json!({"content": "tok1 "}), Value::Null);
    let mut rest: Vec<String> = (2..6)
        .map(|i| event(json!({"content": format!("tok{i} ")}), Value::Null))
        .collect();
    rest.push(event(json!({}), json!("stop")));
    let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
    let (mock, gw) = start("", "");
    // After content: the stream breaks there and the fallback finishes it,
    // as when the event comes in a read of its own.
    let after = [&[first.as_str(), &second, "data: not json\n\n"], &rest[..]].concat();
    mock.fault(body(&after));
    let events = stream(&gw, "small", 6);
    let (text, _) = whole_stream(&events);
    assert_eq!(text, mock_text(6));
    assert_eq!(seen(&mock, "m-large").len(), 1, "continued: {events:?}");
    assert_eq!(access_lines(&gw, 1).pop().unwrap()["resumptions"], 1);
    // The log says where it broke, and not that the event was left out.
    const LEFT_OUT: &str = "left out stream events that were not JSON";
    assert!(gw.log().contains("sent a stream event that is not JSON"));
    assert!(!gw.log().contains(LEFT_OUT), "{}", gw.log());
    // Before any content: nothing it might have carried was sent, so it is
    // left out and the stream goes on, however it was read.
    let before = [&["data: not json\n\n", first.as_str(), &second], &rest[..]].concat();
    mock.fault(body(&before));
    let (text, _) = whole_stream(&stream(&gw, "small", 6));
    assert_eq!(text, mock_text(6));
    assert_eq!(seen(&mock, "m-large").len(), 1, "not continued");
    access_lines(&gw, 2);
    assert_eq!(gw.log().matches(LEFT_OUT).count(), 1, "{}", gw.log());
    // Not resumable: left out after content too, and the stream goes on.
    let (mock, gw) = start_unresumed();
    mock.fault(body(&after));
    let (text, usage) = whole_stream(&stream(&gw, "small", 6));
    assert_eq!(text, mock_text(6));
    assert_eq!(attempts(&mock, "m-large"), 0);
    // What came after it is billed too.
    assert_eq!(billed(&gw).1, usage["completion_tokens"].as_u64().unwrap());
}

#[test]
fn a_stream_that_ends_without_a_whole_event_fails_over() {
    // A 200 event stream whose one event is cut short, then ended: nothing
    // the client could be given, nothing sent, so the fallback answers.
    let cut = json!({
        "error_body": "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.compl",
        "status": 200,
        "content_type": "text/event-stream",
    });
    let (mock, gw) = start("", "");
    let mut fault = cut.clone();
    fault["model"] = json!("m-small");
    mock.fault(fault);
    let events = stream(&gw, "small", 4);
    let (text, _) = whole_stream(&events);
    assert_eq!(text, mock_text(4));
    assert_eq!(attempts(&mock, "m-large"), 1, "the fallback answered");
    // Nor is a stream of comments only (a router's keep-alives, its own
    // upstream having failed).
    let mut fault = cut.clone();
    fault["error_body"] = json!(": PROCESSING\n\n: PROCESSING\n\nid: 1\n\n");
    fault["model"] = json!("m-small");
    mock.fault(fault);
    let (text, _) = whole_stream(&stream(&gw, "small", 3));
    assert_eq!(text, mock_text(3));
    assert_eq!(attempts(&mock, "m-large"), 2, "the fallback answered again");
    // An empty stream is no answer either; with nowhere else to go the
    // client gets the gateway's error, not an empty 200.
    let mut fault = cut.clone();
    fault["error_body"] = json!("");
    fault["model"] = json!("m-solo");
    fault["count"] = json!(10);
    mock.fault(fault);
    let resp = gw.post_json(CHAT, TENANT_KEY, &chat("solo", true));
    assert_bad_gateway(&resp, "without a whole event");
}

#[test]
fn an_empty_answer_fails_over() {
    // A 200 JSON answer with nothing in it (empty, or only a line end) is
    // no answer: nothing was sent, so the fallback answers.
    let (mock, gw) = start("", "");
    for (body, answered) in [("", 1), ("\r\n", 2)] {
        mock.fault(json!({
            "error_body": body,
            "status": 200,
            "content_type": "application/json",
            "model": "m-small",
        }));
        let resp = ask(&gw, "small");
        assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
        assert_eq!(resp.json()["model"], "m-large");
        assert_eq!(
            attempts(&mock, "m-large"),
            answered,
            "the fallback answered"
        );
    }
    // A 204 or a 205 says there is nothing: its empty body is the answer.
    for status in [204, 205] {
        mock.fault(json!({
            "error_body": "",
            "status": status,
            "content_type": "application/json",
            "model": "m-small",
        }));
        let resp = ask(&gw, "small");
        assert_eq!(
            resp.status,
            status,
            "{}",
            String::from_utf8_lossy(&resp.body)
        );
        assert_eq!(attempts(&mock, "m-large"), 2, "no fallback for a {status}");
    }
    // A stream whose one event is the usage report the gateway asked for
    // on the client's behalf (and takes out again) has nothing for the
    // client either: the fallback answers.
    mock.fault(json!({
        "error_body": "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":7,\"total_tokens\":10}}\n\n",
        "status": 200,
        "content_type": "text/event-stream",
        "model": "m-small",
    }));
    let resp = gw.post_json(CHAT, TENANT_KEY, &chat("small", true));
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    assert!(String::from_utf8_lossy(&resp.body).contains("data: [DONE]"));
    assert_eq!(attempts(&mock, "m-large"), 3, "the fallback answered");
    // With nowhere else to go the client gets the gateway's error, not an
    // empty 200 logged as a success.
    mock.fault(json!({
        "error_body": "",
        "status": 200,
        "content_type": "application/json",
        "model": "m-solo",
        "count": 10,
    }));
    let resp = ask(&gw, "solo");
    assert_bad_gateway(&resp, "answered with an empty body");
}

/// Checks `resp` is the gateway's 502 whose message `says` so.
fn assert_bad_gateway(resp: &Response, says: &str) {
    assert_eq!(resp.status, 502, "{}", String::from_utf8_lossy(&resp.body));
    let error = &resp.json()["error"];
    assert!(
        error["message"].as_str().is_some_and(|m| m.contains(says)),
        "{error}"
    );
}

#[test]
fn a_stream_without_done_gets_exactly_one() {
    let (mock, gw) = start("", "");
    mock.fault(json!({"no_done": true, "model": "m-small"}));
    let events = stream(&gw, "small", 4);
    let (text, usage) = whole_stream(&events);
    assert_eq!(text, mock_text(4));
    assert_eq!(billed(&gw).1, usage["completion_tokens"].as_u64().unwrap());
}

#[test]
fn a_prompt_too_long_moves_to_the_context_fallbacks_and_is_never_retried_unchanged() {
    let (mock, gw) = start("", "");
    let too_long = r#"{"error":{"message":"This model's maximum context length is 8192 tokens.","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#;
    mock.fault(json!({"status": 400, "error_body": too_long, "content_type": "application/json", "model": "m-small"}));
    let resp = ask(&gw, "small");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json()["model"], "m-large");
    assert_eq!(
        (attempts(&mock, "m-small"), attempts(&mock, "m-large")),
        (1, 1)
    );
    assert_billed(&gw, &resp.json(), LARGE_PRICE);
    // Without context fallbacks the provider's answer is the client's.
    mock.fault(json!({"status": 400, "error_body": too_long, "content_type": "application/json", "model": "m-large"}));
    let resp = ask(&gw, "large");
    assert_eq!(
        (resp.status, resp.error_code()),
        (400, "context_length_exceeded".to_string())
    );
    assert_eq!(attempts(&mock, "m-large"), 2);
    assert_eq!(
        attempts(&mock, "m-small"),
        1,
        "an ordinary fallback is no context fallback"
    );
}

#[test]
fn a_content_policy_rejection_is_the_answer() {
    let (mock, gw) = start("", "");
    let policy = r#"{"error":{"message":"Your request was rejected by the safety system.","type":"invalid_request_error","param":null,"code":"content_policy_violation"}}"#;
    mock.fault(json!({"status": 400, "error_body": policy, "content_type": "application/json", "model": "m-small"}));
    let resp = ask(&gw, "small");
    assert_eq!(
        (resp.status, resp.error_code()),
        (400, "content_policy_violation".to_string())
    );
    assert_eq!(
        (attempts(&mock, "m-small"), attempts(&mock, "m-large")),
        (1, 0)
    );
    assert_eq!(billed(&gw), (0, 0, 0.0));
}

#[test]
fn an_error_body_under_a_200_is_taken_as_its_status() {
    // Proxies and routers answer 200 with an error body (OpenRouter's, a
    // gateway in front of vLLM): it is no answer, and judged as the error
    // it carries.
    let (mock, gw) = start("", "");
    let under_200 = |body: &str| json!({"status": 200, "error_body": body, "content_type": "application/json", "model": "m-small"});
    // The provider's failure, in OpenAI's shape and vLLM's: the fallback answers.
    for (i, body) in [
        r#"{"error":{"message":"model overloaded","type":"server_error"}}"#,
        r#"{"object":"error","message":"engine dead","type":"InternalServerError","code":500}"#,
    ]
    .into_iter()
    .enumerate()
    {
        mock.fault(under_200(body));
        let resp = ask(&gw, "small");
        assert_eq!(resp.status, 200, "{body}");
        let answer = resp.json();
        assert_eq!(answer["model"], "m-large", "{body}");
        assert_eq!(resp.header("x-runestone-attempts"), Some("2"));
        assert_eq!(attempts(&mock, "m-large"), i as u64 + 1);
    }
    // Only what answered is billed.
    let (prompt, completion, _) = billed(&gw);
    assert_eq!(access_lines(&gw, 2).len(), 2);
    let answered: u64 = access_lines(&gw, 2)
        .iter()
        .map(|l| l["prompt_tokens"].as_u64().unwrap() + l["completion_tokens"].as_u64().unwrap())
        .sum();
    assert_eq!(prompt + completion, answered);
    // Nor is a web page where the answer belongs.
    mock.fault(json!({"status": 200, "error_body": "<html><body>Welcome to nginx!</body></html>", "content_type": "text/plain", "model": "m-small"}));
    let resp = ask(&gw, "small");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json()["model"], "m-large");
    assert_eq!(attempts(&mock, "m-large"), 3);
    // A fault of the request is the client's answer, with its status.
    mock.fault(under_200(
        r#"{"error":{"message":"bad tool","type":"invalid_request_error","code":"invalid_value","param":"tools"}}"#,
    ));
    let resp = ask(&gw, "small");
    assert_eq!(resp.status, 400);
    assert_eq!(resp.json()["error"]["message"], "bad tool");
    assert_eq!(resp.json()["error"]["param"], "tools");
    assert_eq!(resp.json()["error"]["code"], "invalid_value");
    // Whatever of its error a provider names (message, field, code) is
    // masked of its key, in an answer and in a stream's error event.
    let echoing = format!(
        r#"{{"error":{{"message":"no {PROVIDER_KEY}","type":"invalid_request_error","code":"c-{PROVIDER_KEY}","param":"{PROVIDER_KEY}"}}}}"#
    );
    let event = format!("data: {echoing}\n\n");
    for (body, content_type, stream) in [
        (echoing.as_str(), "application/json", false),
        (event.as_str(), "text/event-stream", true),
    ] {
        mock.fault(json!({"status": 200, "error_body": body, "content_type": content_type, "model": "m-small"}));
        let resp = gw.post_json(CHAT, TENANT_KEY, &chat("small", stream));
        let text = String::from_utf8_lossy(&resp.body).into_owned();
        assert_eq!(resp.status, 400, "{text}");
        assert!(!text.contains(PROVIDER_KEY), "{text}");
        let error = &resp.json()["error"];
        let masked = "*".repeat(PROVIDER_KEY.len());
        assert_eq!(error["message"], format!("no {masked}"), "{text}");
        assert_eq!(error["param"], masked.as_str(), "{text}");
        assert_eq!(error["code"], format!("c-{masked}"), "{text}");
    }
    // A field's or code's name holds no control characters (taken out
    // before the mask looks: a key split by one is masked whole).
    let (head, tail) = PROVIDER_KEY.split_at(5);
    let split = format!(
        r#"{{"error":{{"message":"m","type":"invalid_request_error","code":"c\u001b[31mred","param":"{head}\u0007{tail}"}}}}"#
    );
    mock.fault(json!({"status": 200, "error_body": split, "content_type": "application/json", "model": "m-small"}));
    let resp = ask(&gw, "small");
    let error = &resp.json()["error"];
    assert_eq!(error["code"], "c[31mred", "{error}");
    assert_eq!(
        error["param"],
        "*".repeat(PROVIDER_KEY.len()).as_str(),
        "{error}"
    );
    // One that says nothing says so.
    mock.fault(json!({"status": 200, "error_body": r#"{"error":true}"#, "content_type": "application/json", "model": "m-solo", "count": 10}));
    let resp = ask(&gw, "solo");
    assert_eq!(resp.status, 502);
    assert_eq!(
        resp.json()["error"]["message"],
        "The provider answered with an error."
    );
    assert_eq!(attempts(&mock, "m-large"), 3, "not failed over");
    // An answer that merely has an `error` member (null, or empty) is one.
    mock.fault(under_200(
        r#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"m-small","error":null,"choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}]}"#,
    ));
    let resp = ask(&gw, "small");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json()["model"], "m-small");
    // A rate limit rests the deployment; the next one answers.
    mock.fault(under_200(
        r#"{"error":{"message":"slow down","type":"rate_limit_error","code":"rate_limit_exceeded"}}"#,
    ));
    let resp = ask(&gw, "small");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json()["model"], "m-large");
    assert_eq!(resp.header("x-runestone-attempts"), Some("2"));
}

#[test]
fn an_answer_in_the_other_form_than_asked_fails_over() {
    // A provider (or a proxy in front of it) that answers a request for
    // one JSON answer with a stream, or a request for a stream with one
    // JSON answer: the SDKs read neither (a string where a completion
    // belongs; a stream with no event and no error), so the fallback
    // answers, and only its answer is billed.
    let (mock, gw) = start("", "");
    let completion = r#"{"id":"c1","object":"chat.completion","created":1,"model":"m-small","choices":[{"index":0,"message":{"role":"assistant","content":"whole"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}"#;
    let chunk = r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m-small","choices":[{"index":0,"delta":{"role":"assistant","content":"streamed"},"finish_reason":"stop"}]}"#;
    let events = format!("data: {chunk}\n\ndata: [DONE]\n\n");
    mock.fault(json!({"status": 200, "error_body": events, "content_type": "text/event-stream", "model": "m-small"}));
    let resp = ask(&gw, "small");
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    assert_eq!(resp.header("x-runestone-attempts"), Some("2"));
    let answer = resp.json();
    assert_eq!(answer["model"], "m-large");
    mock.fault(json!({"status": 200, "error_body": completion, "content_type": "application/json", "model": "m-small"}));
    let (text, usage) = whole_stream(&stream(&gw, "small", 4));
    assert_eq!(text, mock_text(4));
    assert_eq!(attempts(&mock, "m-large"), 2, "the fallback answered both");
    let (prompt, completion_tokens, _) = billed(&gw);
    assert_eq!(
        (prompt, completion_tokens),
        (
            answer["usage"]["prompt_tokens"].as_u64().unwrap()
                + usage["prompt_tokens"].as_u64().unwrap(),
            answer["usage"]["completion_tokens"].as_u64().unwrap()
                + usage["completion_tokens"].as_u64().unwrap()
        ),
        "only the fallback's answers billed"
    );
    // So does one from a provider whose answers are translated (Anthropic's
    // whole message to a request for a stream).
    let mut config = config(&mock, "", "");
    config.providers.push(format!(
        "  - {{ name: claude, kind: anthropic, base_url: \"http://127.0.0.1:{}\", api_key: \"{PROVIDER_KEY}\" }}",
        mock.port
    ));
    config.models.push_str(
        "  - name: claude-a\n    targets: [{ provider: claude, model: c-a }]\n    fallbacks: [large]\n",
    );
    let gw = Gateway::start(&config);
    let message = r#"{"id":"msg_1","type":"message","role":"assistant","model":"c-a","content":[{"type":"text","text":"whole"}],"stop_reason":"end_turn","usage":{"input_tokens":5,"output_tokens":1}}"#;
    mock.fault(json!({"status": 200, "error_body": message, "content_type": "application/json", "model": "c-a"}));
    let (text, _) = whole_stream(&stream(&gw, "claude-a", 4));
    assert_eq!(text, mock_text(4));
    assert_eq!(attempts(&mock, "m-large"), 3, "the fallback answered");
}

#[test]
fn a_chat_streams_heartbeat_is_no_content() {
    // A router's typed keep-alive before its upstream failed: nothing for
    // the client yet, so the fallback answers.
    let (mock, gw) = start("", "");
    mock.fault(json!({
        "status": 200,
        "content_type": "text/event-stream",
        "error_body": "data: {\"type\":\"heartbeat\"}\n\ndata: {\"error\":{\"message\":\"overloaded\",\"type\":\"server_error\"}}\n\n",
        "model": "m-small",
    }));
    let (text, _) = whole_stream(&stream(&gw, "small", 4));
    assert_eq!(text, mock_text(4));
    assert_eq!(attempts(&mock, "m-large"), 1, "the fallback answered");
}

#[test]
fn a_redirect_is_neither_followed_nor_passed_on_and_fails_over() {
    // A deployment answering 3xx (a base URL the provider moved, plain
    // HTTP where it wants TLS): the client used to get the 307 itself,
    // with no `location`, and no fallback was tried.
    let (mock, gw) = start("", "");
    mock.fault(json!({"status": 307, "model": "m-small"}));
    let resp = ask(&gw, "small");
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    assert_eq!(resp.header("x-runestone-attempts"), Some("2"));
    assert_eq!(
        (attempts(&mock, "m-small"), attempts(&mock, "m-large")),
        (1, 1)
    );
    // Nor is its connection kept: the fallback, straight after, would take
    // it before whatever such a server sends after its answer shows.
    let stats = mock.stats();
    assert_eq!(stats["connections"], 2, "{stats}");
    // With nowhere else to go: the gateway's 502, the provider's failure.
    mock.fault(json!({"status": 304, "model": "m-solo"}));
    let resp = ask(&gw, "solo");
    assert_bad_gateway(&resp, "answered 304");
    assert_eq!(attempts(&mock, "m-solo"), 1, "not retried as a 503 is");
    wait_until(Duration::from_secs(5), "the failure to be counted", || {
        metric_value(
            &gw.metrics(),
            r#"runestone_errors_total{reason="provider_5xx"}"#,
        ) == 1.0
    });
}

/// The primary is down for a minute under steady traffic, then healthy:
/// meanwhile every request is served by the fallback without waiting and
/// the primary sees at most a probe per open period; afterwards traffic is
/// back on it within 30 s.
#[test]
fn a_primary_down_for_a_minute_is_used_again_within_30_s_of_recovering() {
    let (mock, gw) = start("", "");
    mock.fault(json!({"status": 503, "count": 100000, "model": "m-small"}));
    let outage = Instant::now();
    let mut slowest = Duration::ZERO;
    while outage.elapsed() < Duration::from_secs(60) {
        let started = Instant::now();
        let resp = ask(&gw, "small");
        slowest = slowest.max(started.elapsed());
        assert_eq!(resp.status, 200);
        assert_eq!(resp.json()["model"], "m-large");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        slowest < Duration::from_secs(1),
        "no request waited: {slowest:?}"
    );
    let during = attempts(&mock, "m-small");
    // 5 failures open it (a request's same-deployment retry included), then
    // one probe (and its retry refused by the reopened breaker) at about 10,
    // 30 and 60 s.
    assert!(during <= 10, "m-small saw {during} attempts in the outage");
    ureq::post(&format!("http://127.0.0.1:{}/_mock/reset", mock.port))
        .call()
        .unwrap();
    let healthy = Instant::now();
    loop {
        let resp = ask(&gw, "small");
        assert_eq!(resp.status, 200);
        if resp.json()["model"] == "m-small" {
            break;
        }
        assert!(
            healthy.elapsed() < Duration::from_secs(32),
            "m-small not used again within 30 s of recovering"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for _ in 0..5 {
        assert_eq!(ask(&gw, "small").json()["model"], "m-small", "and it stays");
    }
}

/// Anthropic continues a prefill natively: a broken OpenAI stream finished
/// by an Anthropic fallback (translated), and a broken Anthropic stream
/// finished by another Anthropic model.
#[test]
fn anthropic_continues_a_broken_stream_from_the_text_delivered() {
    let mock = Mock::start(&[]);
    let mut config = config(&mock, "", "");
    config.providers.push(format!(
        "  - {{ name: claude, kind: anthropic, base_url: \"http://127.0.0.1:{}\", api_key: \"{PROVIDER_KEY}\", timeouts: {{ idle_ms: 500 }} }}",
        mock.port
    ));
    config.models.push_str(
        "  - name: to-claude
    targets: [{ provider: acct, model: m-openai }]
    fallbacks: [claude-a]
  - name: claude-a
    targets: [{ provider: claude, model: c-a }]
    fallbacks: [claude-b]
  - name: claude-b
    targets: [{ provider: claude, model: c-b }]
",
    );
    let gw = Gateway::start(&config);
    for (model, first, second) in [("to-claude", "m-openai", "c-a"), ("claude-a", "c-a", "c-b")] {
        mock.fault(json!({"disconnect_after_chunks": 3, "model": first}));
        // 16: the mock's reply length when not told (mock_tokens does not
        // survive the translation to Anthropic).
        let events = stream(&gw, model, 16);
        let (text, usage) = whole_stream(&events);
        assert_eq!(text, mock_text(16), "{model}");
        let continuation = seen(&mock, second).pop().unwrap();
        assert_eq!(continuation["prefilled"], true, "{model}");
        assert_eq!(continuation["path"], "/v1/messages");
        assert!(usage["completion_tokens"].as_u64().unwrap() > 7, "{usage}");
    }
    let (prompt, completion, _) = billed(&gw);
    assert!(prompt > 0 && completion > 14);
}

#[test]
fn max_attempts_bounds_a_rejected_prefill_too() {
    let (mock, gw) = start("", "failover: { max_attempts: 2 }\n");
    mock.fault(json!([
        {"disconnect_after_chunks": 3, "model": "m-small"},
        {"reject_prefill": true, "model": "m-large"}
    ]));
    let events = stream(&gw, "small", 10);
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_error", "{events:?}");
    assert_eq!(attempts(&mock, "m-small") + attempts(&mock, "m-large"), 2);
    assert_eq!(access_lines(&gw, 1).pop().unwrap()["attempts"], 2);
}

#[test]
fn a_continuation_that_fails_before_streaming_is_still_one_resumption() {
    let (mock, gw) = start("", "");
    mock.fault(json!([
        {"disconnect_after_chunks": 3, "model": "m-small"},
        {"status": 503, "model": "m-large"}
    ]));
    let (text, _) = whole_stream(&stream(&gw, "small", 10));
    assert_eq!(text, mock_text(10));
    assert_eq!(access_lines(&gw, 1).pop().unwrap()["resumptions"], 1);
    let metrics = gw.metrics();
    for (outcome, n) in [("attempted", 1.0), ("resumed", 1.0), ("failed", 0.0)] {
        assert_eq!(
            metric_value(
                &metrics,
                &format!(
                    r#"runestone_stream_resumptions_total{{model="small",outcome="{outcome}"}}"#
                )
            ),
            n,
            "{outcome}"
        );
    }
}

#[test]
fn a_continuation_that_breaks_is_continued_again() {
    let mock = Mock::start(&[]);
    let mut config = config(&mock, "", "");
    config.models = config
        .models
        .replacen("fallbacks: [large]", "fallbacks: [large, solo]", 1);
    let gw = Gateway::start(&config);
    mock.fault(json!([
        {"disconnect_after_chunks": 3, "model": "m-small"},
        {"disconnect_after_chunks": 2, "model": "m-large"}
    ]));
    let (text, usage) = whole_stream(&stream(&gw, "small", 10));
    assert_eq!(text, mock_text(10));
    assert_eq!(billed(&gw).1, usage["completion_tokens"].as_u64().unwrap());
    assert_eq!(access_lines(&gw, 1).pop().unwrap()["resumptions"], 2);
}

#[test]
fn a_stream_that_ends_before_it_finished_is_resumed_not_sealed() {
    let (mock, gw) = start("", "");
    mock.fault(json!({"end_after_chunks": 4, "model": "m-small"}));
    let (text, _) = whole_stream(&stream(&gw, "small", 10));
    assert_eq!(text, mock_text(10));
    assert_eq!(attempts(&mock, "m-large"), 1);
    // Nowhere to go: the client is told, not handed a [DONE].
    mock.fault(json!({"end_after_chunks": 4, "model": "m-solo"}));
    let events = stream(&gw, "solo", 10);
    assert!(!events.iter().any(|e| e == "[DONE]"), "{events:?}");
    assert!(events.last().unwrap().contains("upstream_error"));
}

#[test]
fn streams_with_several_choices_or_logprobs_are_not_resumed() {
    let (mock, gw) = start("", "");
    for extra in [json!({"n": 2}), json!({"logprobs": true})] {
        mock.fault(json!({"disconnect_after_chunks": 3, "model": "m-small"}));
        let mut body = chat("small", true);
        body["mock_tokens"] = json!(10);
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let mut events = Vec::new();
        read_sse(gw.port, TENANT_KEY, &body, |data, _| {
            events.push(data.to_owned())
        });
        assert!(events.last().unwrap().contains("upstream_error"), "{extra}");
    }
    assert_eq!(attempts(&mock, "m-large"), 0);
}

#[test]
fn an_overflow_tenant_is_served_by_the_fallback_not_parked_behind_its_primary() {
    let mock = Mock::start(&[]);
    let mut config = config(&mock, "", "");
    config
        .tenants
        .push_str("    overflow: { enabled: true, max_wait_seconds: 30 }\n");
    let gw = Gateway::start(&config);
    mock.fault(json!({"status": 429, "retry_after": 8, "model": "m-small"}));
    assert_eq!(ask(&gw, "small").json()["model"], "m-large");
    let started = Instant::now();
    let resp = ask(&gw, "small");
    assert_eq!(
        (resp.status, resp.json()["model"].clone()),
        (200, json!("m-large"))
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_deployment_resting_at_the_providers_request_keeps_the_instance_ready() {
    let (mock, gw) = start("", "");
    mock.fault(json!({"status": 429, "retry_after": 3600, "model": "m-solo"}));
    assert_eq!(ask(&gw, "solo").status, 429);
    let ready = gw.get("/ready", None);
    assert_eq!(
        ready.status,
        200,
        "{}",
        String::from_utf8_lossy(&ready.body)
    );
    assert_eq!(ready.json()["checks"]["models"]["solo"], "rate_limited");
}

#[test]
fn one_models_dropped_requests_leave_the_other_models_on_the_account_alone() {
    let (mock, gw) = start("", "");
    mock.fault(json!({"drop_connection": true, "count": 1000, "model": "m-solo"}));
    for _ in 0..6 {
        // 502 until m-solo's breaker opens, then 503.
        let status = ask(&gw, "solo").status;
        assert!(status == 502 || status == 503, "{status}");
    }
    for model in ["large", "small"] {
        let resp = ask(&gw, model);
        assert_eq!(
            resp.status,
            200,
            "{model}: {}",
            String::from_utf8_lossy(&resp.body)
        );
        assert_eq!(resp.header("x-runestone-attempts"), Some("1"));
    }
}

#[test]
fn a_probe_in_flight_does_not_stop_a_priority_route_using_its_other_target() {
    let mock = Mock::start(&[]);
    let mut config = config(
        &mock,
        "",
        "circuit_breaker: { consecutive_failures: 1, open_seconds: 1 }\nfailover: { same_deployment_retries: 0 }\n",
    );
    config.models.push_str(
        "  - name: dual\n    strategy: priority\n    targets: [{ provider: acct, model: m-a }, { provider: acct, model: m-b }]\n",
    );
    let gw = Gateway::start(&config);
    mock.fault(json!({"status": 503, "model": "m-a"}));
    assert_eq!(ask(&gw, "dual").json()["model"], "m-b");
    std::thread::sleep(Duration::from_millis(1100)); // m-a half-opens
    mock.fault(json!({"stall_ms": 800, "model": "m-a"}));
    let port = gw.port;
    let probe = std::thread::spawn(move || {
        ureq::post(&format!("http://127.0.0.1:{port}{CHAT}"))
            .set("authorization", &format!("Bearer {TENANT_KEY}"))
            .send_json(chat("dual", false))
            .map(|r| r.status())
            .unwrap_or(0)
    });
    wait_until(Duration::from_secs(2), "the probe to reach m-a", || {
        attempts(&mock, "m-a") == 2
    });
    let during = ask(&gw, "dual");
    assert_eq!(
        during.status,
        200,
        "{}",
        String::from_utf8_lossy(&during.body)
    );
    assert_eq!(during.json()["model"], "m-b");
    assert_eq!(probe.join().unwrap(), 200);
}

#[test]
fn the_first_token_deadline_counts_from_the_request() {
    let (mock, gw) = start("", "");
    // Head after 700 ms, first token 700 ms later: 1.4 s > first_token_ms.
    mock.fault(json!({"latency_ms": 700}));
    mock.fault(json!({"first_token_ms": 700, "model": "m-small"}));
    let events = stream(&gw, "small", 3);
    assert!(events[0].contains("m-large"), "{}", events[0]);
}

#[test]
fn a_retry_after_of_zero_is_not_taken_literally() {
    let (mock, gw) = start("", "failover: { max_attempts: 4 }\n");
    mock.fault(json!({"status": 429, "retry_after_ms": 0, "count": 2, "model": "m-solo"}));
    assert_eq!(ask(&gw, "solo").status, 200);
    let at: Vec<u64> = seen(&mock, "m-solo")
        .iter()
        .map(|r| r["at_ms"].as_u64().unwrap())
        .collect();
    assert_eq!(at.len(), 3);
    assert!(at.windows(2).all(|w| w[1] - w[0] >= 90), "{at:?}");
}

#[test]
fn a_route_that_said_too_long_is_not_asked_again_as_a_context_fallback() {
    let (mock, gw) = start("", "failover: { max_attempts: 5 }\n");
    let too_long = r#"{"error":{"message":"This model's maximum context length is 8192 tokens.","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#;
    mock.fault(json!([
        {"status": 504, "model": "m-small"},
        {"status": 400, "error_body": too_long, "content_type": "application/json", "model": "m-large", "count": 5}
    ]));
    let resp = ask(&gw, "small");
    assert_eq!(
        (resp.status, resp.error_code()),
        (400, "context_length_exceeded".into())
    );
    assert_eq!(attempts(&mock, "m-large"), 1);
}

#[test]
fn anthropics_input_plus_max_tokens_error_moves_to_the_context_fallback() {
    let mock = Mock::start(&[]);
    let mut config = config(&mock, "", "");
    config.providers.push(format!(
        "  - {{ name: claude, kind: anthropic, base_url: \"http://127.0.0.1:{}\", api_key: \"{PROVIDER_KEY}\" }}",
        mock.port
    ));
    config
        .models
        .push_str("  - name: claude-small\n    targets: [{ provider: claude, model: c-small }]\n    context_fallbacks: [large]\n");
    let gw = Gateway::start(&config);
    let body = r#"{"type":"error","error":{"type":"invalid_request_error","message":"input length and `max_tokens` exceed context limit: 199759 + 8192 > 200000, decrease input length or `max_tokens` and try again"}}"#;
    mock.fault(json!({"status": 400, "error_body": body, "content_type": "application/json", "model": "c-small"}));
    let resp = ask(&gw, "claude-small");
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    assert_eq!(resp.json()["model"], "m-large");
}
