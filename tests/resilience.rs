//! Upstream resilience through real processes and runestone-mock fault
//! injection: failover, circuit breakers, health checks, strategies,
//! fallbacks, timeouts, and (with stream resumption off) no retry once a
//! byte reached the client. tests/failover.rs has the failover policy's
//! scenarios.

mod common;

use common::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::time::{Duration, Instant};

const CHAT: &str = "/v1/chat/completions";

/// Chat requests the mock answered or refused.
fn chats(mock: &Mock) -> u64 {
    mock.stats()["by_path"][CHAT].as_u64().unwrap_or(0)
}

/// A gateway over providers `a` and `b` (one mock each) serving `m` from
/// both with `strategy`; `provider_extra` is added to both providers' YAML
/// and `extra` at the top level.
fn pair(a: &Mock, b: &Mock, strategy: &str, provider_extra: &str, extra: &str) -> GatewayConfig {
    let mut config = GatewayConfig::new(a);
    config.providers = vec![
        format!(
            "  - {{ name: a, base_url: \"{}\", weight: 3{provider_extra} }}",
            a.base_url()
        ),
        format!(
            "  - {{ name: b, base_url: \"{}\", weight: 1{provider_extra} }}",
            b.base_url()
        ),
    ];
    config.models = format!("\n  - name: m\n    strategy: {strategy}\n    targets: [{{ provider: a }}, {{ provider: b }}]\n");
    config.tenants = format!("\n  - id: acme\n    keys: [\"{TENANT_KEY}\"]\n");
    config.extra = extra.to_string();
    config
}

/// `runestone_circuit_state` of provider `a` (on `a`'s backend).
fn circuit_state_of_a(metrics: &str, a: &Mock) -> f64 {
    metric_value(
        metrics,
        &format!(
            r#"runestone_circuit_state{{backend="127.0.0.1:{}",provider="a"}}"#,
            a.port
        ),
    )
}

fn ask(gw: &Gateway) -> Response {
    gw.post_json(CHAT, TENANT_KEY, &chat("m", false))
}

#[test]
fn a_backends_5xx_burst_never_reaches_the_client() {
    let (a, b) = (Mock::start(&[]), Mock::start(&[]));
    let gw = Gateway::start(&pair(&a, &b, "round_robin", "", ""));
    a.fault(json!({"status": 503, "count": 3, "path": CHAT}));
    let mut attempts = Vec::new();
    for _ in 0..8 {
        let resp = ask(&gw);
        assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
        attempts.push(resp.header("x-runestone-attempts").unwrap().to_string());
    }
    // Each refused attempt was followed by another (the same deployment
    // once more, then the other), so the extra attempts are the refusals.
    let extra: u64 = attempts.iter().map(|a| a.parse::<u64>().unwrap() - 1).sum();
    assert_eq!(extra, 3, "{attempts:?}");
    assert_eq!(
        chats(&a) + chats(&b),
        11,
        "8 answers and 3 refused attempts"
    );
}

#[test]
fn replays_a_1_mib_body_on_failover() {
    let (a, b) = (Mock::start(&[]), Mock::start(&[]));
    let gw = Gateway::start(&pair(&a, &b, "priority", "", ""));
    // 502 twice: once more on the same deployment, then the other one.
    a.fault(json!({"status": 502, "count": 2, "path": CHAT}));
    let filler = "z".repeat(1024 * 1024);
    let body = format!(r#"{{"messages":[{{"role":"user","content":"{filler}"}}],"model":"m"}}"#);
    let resp = gw.post_raw(
        CHAT,
        &[("authorization", &format!("Bearer {TENANT_KEY}"))],
        body.as_bytes(),
    );
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("x-runestone-provider"), Some("b"));
    assert_eq!(resp.header("x-runestone-attempts"), Some("3"));
    let digest = hex::encode(Sha256::digest(body.as_bytes()));
    for mock in [&a, &b] {
        let seen = mock.requests().pop().unwrap();
        assert_eq!(
            seen["body_sha256"], digest,
            "the whole body reached each attempt"
        );
    }
}

/// Sends requests until `a` sees one. Returns how long after `since` the
/// request that reached `a` was answered, and when that request was sent.
///
/// `since` is taken before the requests that open the breaker are sent, so
/// the breaker opened after it, and the probe went out before its request
/// was answered: the duration returned is never shorter than the time the
/// breaker stayed open, however slow the machine running the test, and far
/// shorter than the schedule if the gateway probes too soon.
fn until_a_is_tried(
    gw: &Gateway,
    a: &Mock,
    since: Instant,
    limit: Duration,
) -> (Duration, Instant) {
    let before = chats(a);
    loop {
        let sent = Instant::now();
        let resp = ask(gw);
        assert!(resp.status == 200 || resp.status >= 500, "{}", resp.status);
        if chats(a) > before {
            return (since.elapsed(), sent);
        }
        assert!(
            since.elapsed() < limit,
            "a was not tried again within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

#[test]
fn breaker_opens_half_opens_on_schedule_closes_and_reopens_for_longer() {
    let (a, b) = (Mock::start(&[]), Mock::start(&[]));
    let breaker =
        "circuit_breaker: { consecutive_failures: 3, open_seconds: 1, max_open_seconds: 8 }\n";
    let gw = Gateway::start(&pair(&a, &b, "priority", "", breaker));
    let state = |gw: &Gateway| {
        let metrics = gw.metrics();
        metrics
            .lines()
            .find(|l| l.starts_with("runestone_circuit_state{") && l.contains("provider=\"a\""))
            .and_then(|l| l.rsplit(' ').next()?.parse::<i64>().ok())
    };

    a.fault(json!({"status": 500, "count": 3, "path": CHAT}));
    let opening = Instant::now();
    for _ in 0..3 {
        let resp = ask(&gw);
        assert_eq!(
            (resp.status, resp.header("x-runestone-provider")),
            (200, Some("b"))
        );
    }
    assert_eq!(state(&gw), Some(2), "open after 3 consecutive failures");
    let before = chats(&a);
    let resp = ask(&gw);
    assert_eq!(
        resp.header("x-runestone-attempts"),
        Some("1"),
        "an open backend is not tried"
    );
    assert_eq!(chats(&a), before);

    // Half-open after open_seconds: the probe succeeds and closes it.
    let (waited, _) = until_a_is_tried(&gw, &a, opening, Duration::from_secs(5));
    assert!(
        waited >= Duration::from_secs(1),
        "probed after {waited:?}, before the schedule"
    );
    assert_eq!(state(&gw), Some(0), "closed after a good probe");

    // Open again, then a bad probe re-opens it for twice as long.
    a.fault(json!({"status": 500, "count": 4, "path": CHAT}));
    let opening = Instant::now();
    for _ in 0..3 {
        assert_eq!(ask(&gw).status, 200);
    }
    assert_eq!(state(&gw), Some(2));
    let (first, probed) = until_a_is_tried(&gw, &a, opening, Duration::from_secs(5)); // the bad probe
    assert!(first >= Duration::from_secs(1), "{first:?}");
    assert_eq!(state(&gw), Some(2), "re-opened after a bad probe");
    let (second, _) = until_a_is_tried(&gw, &a, probed, Duration::from_secs(8));
    assert!(
        second >= Duration::from_secs(2),
        "re-open lasted {second:?}, expected about 2 s"
    );
    assert_eq!(state(&gw), Some(0));
}

#[test]
fn answers_503_at_once_with_the_time_the_breaker_half_opens() {
    let a = Mock::start(&[]);
    let mut config = GatewayConfig::new(&a);
    config.extra = "circuit_breaker: { consecutive_failures: 2, open_seconds: 5 }\n".into();
    let gw = Gateway::start(&config);
    a.fault(json!({"status": 500, "count": 2, "path": CHAT}));
    // A 500 is tried once more on the same deployment: two failures.
    let resp = gw.post_json(CHAT, TENANT_KEY, &chat("gpt-4o-mini", false));
    assert_eq!(
        (resp.status, resp.error_code()),
        (502, "upstream_error".to_string())
    );
    assert_eq!(chats(&a), 2);
    let started = Instant::now();
    let resp = gw.post_json(CHAT, TENANT_KEY, &chat("gpt-4o-mini", false));
    let took = started.elapsed();
    assert_eq!(
        (resp.status, resp.error_code()),
        (503, "no_healthy_upstream".to_string())
    );
    assert!(
        took < Duration::from_secs(1),
        "answered at once, not after timeouts: {took:?}"
    );
    let ms: u64 = resp.header("retry-after-ms").unwrap().parse().unwrap();
    assert!((3_000..=5_000).contains(&ms), "retry-after-ms {ms}");
    assert_eq!(
        resp.header("retry-after"),
        Some(ms.div_ceil(1000).to_string().as_str())
    );
    let ready = gw.get("/ready", None);
    assert_eq!(ready.status, 503);
    assert_eq!(
        ready.json()["checks"]["providers"]["mock"]["backends"][0]["circuit"],
        "open"
    );
}

#[test]
fn health_checks_remove_and_restore_a_backend() {
    let (a, b) = (Mock::start(&[]), Mock::start(&[]));
    let hc = ", health_check: { path: \"/models\", interval_seconds: 1, unhealthy_threshold: 1, healthy_threshold: 1, timeout_ms: 500 }";
    let gw = Gateway::start(&pair(&a, &b, "round_robin", hc, ""));
    let healthy = |gw: &Gateway| {
        metric_value(
            &gw.metrics(),
            &format!(
                r#"runestone_upstream_healthy{{backend="127.0.0.1:{}",provider="a"}}"#,
                a.port
            ),
        )
    };
    wait_until(Duration::from_secs(5), "a's first health check", || {
        a.stats()["by_path"]["/v1/models"].as_u64() > Some(0)
    });
    a.fault(json!({"status": 503, "count": 3, "path": "/v1/models"}));
    wait_until(Duration::from_secs(5), "a to fail its health check", || {
        healthy(&gw) == 0.0
    });
    let ready = gw.get("/ready", None).json();
    assert_eq!(
        ready["checks"]["providers"]["a"]["backends"][0]["healthy"],
        false
    );
    let before = chats(&a);
    for _ in 0..6 {
        assert_eq!(ask(&gw).header("x-runestone-provider"), Some("b"));
    }
    assert_eq!(chats(&a), before, "an unhealthy backend leaves selection");
    wait_until(
        Duration::from_secs(8),
        "a to pass its health check again",
        || healthy(&gw) == 1.0,
    );
    let providers: Vec<String> = (0..6)
        .map(|_| ask(&gw).header("x-runestone-provider").unwrap().to_string())
        .collect();
    assert!(
        providers.iter().any(|p| p == "a"),
        "a is back in selection: {providers:?}"
    );
}

#[test]
fn weighted_strategy_splits_by_weight() {
    let (a, b) = (Mock::start(&[]), Mock::start(&[]));
    let gw = Gateway::start(&pair(&a, &b, "weighted", "", ""));
    let n = 400;
    for _ in 0..n {
        assert_eq!(ask(&gw).status, 200);
    }
    let share = chats(&a) as f64 / n as f64;
    assert!(
        (0.65..=0.85).contains(&share),
        "a (weight 3 of 4) served {share}"
    );
}

#[test]
fn falls_back_to_the_next_model_when_no_target_can_serve() {
    let backup = Mock::start(&[]);
    let mut config = GatewayConfig::new(&backup);
    config.providers.push(format!(
        "  - {{ name: dead, base_url: \"http://127.0.0.1:{}/v1\" }}",
        free_port()
    ));
    config.models = "
  - name: primary
    targets: [{ provider: dead }]
    fallbacks: [backup]
  - name: backup
    targets: [{ provider: mock, model: backup-model }]
"
    .into();
    config.tenants = format!("\n  - id: acme\n    keys: [\"{TENANT_KEY}\"]\n");
    let gw = Gateway::start(&config);
    let resp = gw.post_json(CHAT, TENANT_KEY, &chat("primary", false));
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("x-runestone-provider"), Some("mock"));
    assert_eq!(resp.header("x-runestone-attempts"), Some("2"));
    assert_eq!(backup.requests()[0]["model"], "backup-model");
}

/// `pair` with stream resumption turned off for `m`.
fn without_resumption(config: GatewayConfig) -> GatewayConfig {
    let mut config = config;
    config.models.push_str("    resume_streams: false\n");
    config
}

#[test]
fn without_resumption_never_retries_once_a_byte_reached_the_client() {
    let (a, b) = (Mock::start(&[]), Mock::start(&[]));
    let gw = Gateway::start(&without_resumption(pair(&a, &b, "priority", "", "")));
    a.fault(json!({"disconnect_after_chunks": 3, "path": CHAT}));
    let mut body = chat("m", true);
    body["mock_tokens"] = json!(20);
    let (status, events) = sse_events(gw.port, CHAT, TENANT_KEY, &body);
    assert_eq!(status, 200);
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(
        last["error"]["code"], "upstream_error",
        "the break reaches the client in-band"
    );
    assert!(!events.iter().any(|e| e == "[DONE]"));
    assert_eq!(chats(&b), 0, "no retry after bytes were sent");
    assert_eq!(ask(&gw).status, 200, "the gateway stays healthy");
    wait_until(
        Duration::from_secs(5),
        "the broken stream to be counted",
        || {
            metric_value(
                &gw.metrics(),
                r#"runestone_errors_total{reason="provider_stream_broken"}"#,
            ) == 1.0
        },
    );
}

/// A gateway over `a` then `b`, without resumption, whose idle timeout
/// is 300 ms and whose breaker opens at one failure: a stall shows at once.
fn quick_to_stall(a: &Mock, b: &Mock) -> Gateway {
    Gateway::start(&without_resumption(pair(
        a,
        b,
        "priority",
        ", timeouts: { idle_ms: 300 }",
        "circuit_breaker: { consecutive_failures: 1 }\n",
    )))
}

#[test]
fn without_resumption_ends_a_stalled_stream_within_the_idle_timeout() {
    let (a, b) = (Mock::start(&[]), Mock::start(&[]));
    let gw = quick_to_stall(&a, &b);
    a.fault(json!({"stall_after_chunks": 2, "stall_ms": 10000, "path": CHAT}));
    let mut body = chat("m", true);
    body["mock_tokens"] = json!(10);
    let started = Instant::now();
    let (_, events) = sse_events(gw.port, CHAT, TENANT_KEY, &body);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "stream ended after {took:?}");
    assert!(events.last().unwrap().contains("stalled"), "{events:?}");
    let state = circuit_state_of_a(&gw.metrics(), &a);
    assert_eq!(state, 2.0, "a stall counts as a failure");
}

#[test]
fn a_provider_slower_than_its_total_timeout_is_cut_there_and_counted_as_failing() {
    // Each gap within the idle timeout, the whole past the total: the time
    // ran out waiting for the provider (the client reads at once), so it is
    // the provider's failure, unlike a slow client's (tests/hardening.rs).
    let (a, b) = (
        Mock::start(&["--tokens-per-second", "10"]),
        Mock::start(&[]),
    );
    let gw = Gateway::start(&without_resumption(pair(
        &a,
        &b,
        "priority",
        ", timeouts: { idle_ms: 300, total_ms: 1000 }",
        "circuit_breaker: { consecutive_failures: 1 }\n",
    )));
    let mut body = chat("m", true);
    body["mock_tokens"] = json!(30);
    let started = Instant::now();
    let (_, events) = sse_events(gw.port, CHAT, TENANT_KEY, &body);
    assert!(started.elapsed() < Duration::from_secs(2), "{events:?}");
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_error", "{last}");
    assert!(
        last["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("did not finish within its total timeout")),
        "{last}"
    );
    let state = circuit_state_of_a(&gw.metrics(), &a);
    assert_eq!(state, 2.0, "the provider's failure");
}

#[test]
fn streams_whose_provider_data_is_always_there_are_cut_at_the_total_timeout() {
    // Ten streams of 100,000 tokens sent as fast as the mock can: the
    // gateway is the bottleneck, so a read never waits and the deadline
    // must be looked at without one (else they ran to the end, 20 s).
    let (a, b) = (Mock::start(&[]), Mock::start(&[]));
    let gw = Gateway::start(&without_resumption(pair(
        &a,
        &b,
        "priority",
        ", timeouts: { total_ms: 2000 }",
        "",
    )));
    let port = gw.port;
    let streams: Vec<_> = (0..10)
        .map(|_| {
            std::thread::spawn(move || {
                let mut body = chat("m", true);
                body["mock_tokens"] = json!(100_000);
                let (_, events) = sse_events(port, CHAT, TENANT_KEY, &body);
                events.last().cloned().unwrap_or_default()
            })
        })
        .collect();
    for stream in streams {
        let last = stream.join().unwrap();
        assert!(
            last.contains("did not finish within its total timeout"),
            "{}",
            &last[..last.len().min(300)]
        );
    }
}

#[test]
fn a_paced_stream_longer_than_the_idle_timeout_is_whole_and_its_stall_is_seen() {
    // Tokens every 100 ms for over a second, the idle timeout 300 ms: each
    // gap is within it, so the stream is whole however long it runs. The
    // gateway's stall timer is armed once and moved on only when it fires
    // (not at every chunk), so this is what shows it moves on right.
    let (a, b) = (
        Mock::start(&["--tokens-per-second", "10"]),
        Mock::start(&[]),
    );
    let gw = quick_to_stall(&a, &b);
    let mut body = chat("m", true);
    body["mock_tokens"] = json!(14);
    let (_, events) = sse_events(gw.port, CHAT, TENANT_KEY, &body);
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    assert!(!events.iter().any(|e| e.contains("stalled")), "{events:?}");
    let content = |events: &[String]| {
        events
            .iter()
            .filter(|e| e.contains(r#""content":"#) && !e.contains(r#""content":"""#))
            .count()
    };
    assert_eq!(content(&events), 14, "{events:?}");

    // The same pace, then a stall after the eighth chunk: seen at the
    // idle timeout after the last chunk, not at the timer's first setting.
    a.fault(json!({"stall_after_chunks": 8, "stall_ms": 3000, "path": CHAT}));
    let started = Instant::now();
    let (_, events) = sse_events(gw.port, CHAT, TENANT_KEY, &body);
    let took = started.elapsed();
    assert!(events.last().unwrap().contains("stalled"), "{events:?}");
    assert!(content(&events) >= 6, "{events:?}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "the stall was seen after {took:?}"
    );
}

#[test]
fn a_body_held_open_after_its_last_event_ends_within_a_second_or_so() {
    // The default idle timeout (far longer): after `[DONE]` the rest of
    // the body is read for at most a second, so the client's stream ends
    // then, not when the provider lets go.
    let (a, b) = (Mock::start(&[]), Mock::start(&[]));
    let gw = Gateway::start(&without_resumption(pair(&a, &b, "priority", "", "")));
    a.fault(json!({"linger_ms": 6000}));
    let started = Instant::now();
    let (_, events) = sse_events(gw.port, CHAT, TENANT_KEY, &chat("m", true));
    let took = started.elapsed();
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    assert!(
        took < Duration::from_secs(4),
        "the body ended after {took:?}"
    );
}

#[test]
fn a_stream_that_stalls_after_its_last_event_is_whole() {
    // `[DONE]` went by, then the body neither ends nor sends: the answer
    // is whole, so the stream ends cleanly at the idle timeout (no error
    // event after `[DONE]`) and the backend is not blamed.
    let (a, b) = (Mock::start(&[]), Mock::start(&[]));
    let gw = quick_to_stall(&a, &b);
    a.fault(json!({"linger_ms": 10000, "count": 2}));
    let (_, events) = sse_events(gw.port, CHAT, TENANT_KEY, &chat("m", true));
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    assert!(!events.iter().any(|e| e.contains("error")), "{events:?}");
    // A Responses stream's last event is `response.completed`.
    let body = json!({"model": "m", "input": "hi", "stream": true});
    let (_, events) = sse_events(gw.port, "/v1/responses", TENANT_KEY, &body);
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["type"], "response.completed", "{events:?}");
    let tried = |m: &Mock| {
        m.stats()["by_path"]
            .as_object()
            .unwrap()
            .values()
            .filter_map(Value::as_u64)
            .sum::<u64>()
    };
    assert_eq!((tried(&a), tried(&b)), (2, 0), "nothing was tried again");
    let metrics = gw.metrics();
    let state = circuit_state_of_a(&metrics, &a);
    assert_eq!(state, 0.0, "a whole answer is not a failure");
    assert!(
        !metrics.contains("provider_stream_broken"),
        "counted as broken:\n{metrics}"
    );
}

#[test]
fn fails_over_when_the_first_byte_is_too_slow() {
    let slow = Mock::start(&["--latency-ms", "2000"]);
    let fast = Mock::start(&[]);
    let gw = Gateway::start(&pair(
        &slow,
        &fast,
        "priority",
        ", timeouts: { first_byte_ms: 300 }",
        "",
    ));
    let started = Instant::now();
    let resp = ask(&gw);
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("x-runestone-provider"), Some("b"));
    assert!(started.elapsed() < Duration::from_millis(1500));
}

#[test]
fn a_provider_429_fails_over_and_cools_the_backend_down() {
    let (a, b) = (Mock::start(&[]), Mock::start(&[]));
    let gw = Gateway::start(&pair(
        &a,
        &b,
        "priority",
        "",
        "circuit_breaker: { rate_limit_cooldown_seconds: 5 }\n",
    ));
    // The provider's own wait (2 s), not the configured default, is kept.
    a.fault(json!({"status": 429, "retry_after": 2, "path": CHAT}));
    let cooling = Instant::now();
    let resp = ask(&gw);
    assert_eq!(
        (resp.status, resp.header("x-runestone-provider")),
        (200, Some("b"))
    );
    let before = chats(&a);
    for _ in 0..3 {
        assert_eq!(
            ask(&gw).header("x-runestone-provider"),
            Some("b"),
            "a cools down"
        );
    }
    assert_eq!(chats(&a), before);
    let state = circuit_state_of_a(&gw.metrics(), &a);
    assert_eq!(state, 0.0, "a 429 is not a breaker failure");
    let (waited, _) = until_a_is_tried(&gw, &a, cooling, Duration::from_secs(4));
    assert!(
        waited >= Duration::from_secs(2),
        "cool-down lasted {waited:?}"
    );
}

#[test]
fn a_provider_429_everywhere_reaches_the_client_as_429() {
    let a = Mock::start(&[]);
    let gw = Gateway::start(&GatewayConfig::new(&a));
    // A wait longer than failover.max_retry_wait_ms is not waited out.
    a.fault(json!({"status": 429, "retry_after": 10, "path": CHAT}));
    let started = Instant::now();
    let resp = gw.post_json(CHAT, TENANT_KEY, &chat("gpt-4o-mini", false));
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(
        (resp.status, resp.error_code()),
        (429, "upstream_rate_limited".to_string())
    );
    assert_eq!(resp.header("retry-after"), Some("10"));
    assert_eq!(chats(&a), 1);
}
