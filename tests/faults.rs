//! Issue 9: the fault suite. Each fault strikes while clients keep sending
//! (streams and JSON); each test states what the clients saw and checks
//! that counters, slots and queues are consistent afterwards. Two more
//! faults have their own tests: a gateway killed with parked async jobs
//! (tests/overflow.rs, `async_jobs_survive_a_gateway_crash_and_run_exactly_once`)
//! and a graceful upgrade under load (tests/operations.rs).

mod common;

use common::*;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// What one client request ended as: its status, and for a stream whether
/// it reached `[DONE]`.
fn outcome(gw: &Gateway, key: &str, stream: bool) -> String {
    if stream {
        let mut done = false;
        let status = read_sse(gw.port, key, &chat("gpt-4o-mini", true), |data, _| {
            done |= data == "[DONE]"
        });
        match (status, done) {
            (200, true) => "stream 200".into(),
            (200, false) => "stream broken".into(),
            (status, _) => format!("stream {status}"),
        }
    } else {
        let resp = gw.post_json("/v1/chat/completions", key, &chat("gpt-4o-mini", false));
        format!("json {}", resp.status)
    }
}

/// Runs `workers` clients (every other request a stream) while `fault`
/// runs; returns how many requests ended each way.
fn under_load(gw: &Gateway, key: &str, fault: impl FnOnce()) -> BTreeMap<String, usize> {
    let stop = AtomicBool::new(false);
    let sent = AtomicUsize::new(0);
    let seen = Mutex::new(BTreeMap::new());
    std::thread::scope(|scope| {
        for _ in 0..6 {
            scope.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let n = sent.fetch_add(1, Ordering::Relaxed);
                    let what = outcome(gw, key, n.is_multiple_of(2));
                    *seen.lock().unwrap().entry(what).or_insert(0) += 1;
                }
            });
        }
        std::thread::sleep(Duration::from_millis(500));
        fault();
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
    });
    let seen = seen.into_inner().unwrap();
    assert_eq!(seen.values().sum::<usize>(), sent.load(Ordering::Relaxed));
    seen
}

/// After the load: nothing in flight, every answer counted, and the
/// gateway serving again.
fn assert_consistent(gw: &Gateway, seen: &BTreeMap<String, usize>) {
    let total: usize = seen.values().sum();
    wait_until(Duration::from_secs(10), "every answer counted", || {
        let counted = metric_sum(
            &gw.metrics(),
            "runestone_requests_total",
            &["model=\"gpt-4o-mini\""],
        );
        counted == total as f64
    });
    let metrics = gw.metrics();
    assert_eq!(
        metric_value(&metrics, r#"runestone_inflight_requests{tenant="acme"}"#),
        0.0,
        "nothing left in flight: {seen:?}"
    );
    wait_until(
        Duration::from_secs(15),
        "the gateway to serve again",
        || {
            outcome(gw, TENANT_KEY, false) == "json 200"
                && outcome(gw, TENANT_KEY, true) == "stream 200"
        },
    );
}

/// Tenant `acme` with a concurrency limit of `slots` (the load runs six
/// clients).
fn with_limits(mock: &Mock, redis: Option<&Redis>, slots: u32) -> GatewayConfig {
    let mut config = GatewayConfig::new(mock);
    config.tenants = format!(
        "\n  - id: acme\n    keys: [\"{TENANT_KEY}\"]\n    limits: {{ requests_per_minute: 1000000, max_concurrent: {slots} }}\n"
    );
    config.extra = "pricing:\n  gpt-4o-mini: { input: 1.0, output: 2.0 }\n".into();
    if let Some(redis) = redis {
        config.extra += &format!("redis: {{ url: \"{}\", timeout_ms: 100 }}\n", redis.url());
    }
    config
}

#[test]
fn the_provider_dies_mid_stream_and_comes_back() {
    // Paced, so streams are mid-way when the provider dies.
    let args = ["--tokens-per-second", "40"];
    let mock = Mock::start(&args);
    let port = mock.port;
    let mut config = with_limits(&mock, None, 100);
    config.extra += "circuit_breaker: { open_seconds: 1 }\n";
    let gw = Gateway::start(&config);
    let mut mock = Some(mock);
    let seen = under_load(&gw, TENANT_KEY, || {
        drop(mock.take());
        std::thread::sleep(Duration::from_millis(700));
        mock = Some(Mock::start_on(port, &args));
    });
    // Clients saw finished and broken streams, errors while it was down
    // (no backend at all, or its breaker open), and never a 429 or a hang.
    let allowed = [
        "stream 200",
        "stream broken",
        "json 200",
        "json 502",
        "json 503",
        "stream 502",
        "stream 503",
    ];
    assert!(
        seen.keys().all(|k| allowed.contains(&k.as_str())),
        "{seen:?}"
    );
    let broken = seen.get("stream broken").copied().unwrap_or(0);
    assert!(broken > 0, "a stream was cut: {seen:?}");
    assert_consistent(&gw, &seen);
    let metrics = gw.metrics();
    assert_eq!(
        metric_value(
            &metrics,
            r#"runestone_errors_total{reason="provider_stream_broken"}"#
        ),
        broken as f64,
        "each broken stream counted once: {seen:?}"
    );
}

fn check_redis_fault(freeze: bool) {
    let redis = Redis::start();
    let mock = Mock::start(&[]);
    let gw = Gateway::start(&with_limits(&mock, Some(&redis), 4));
    let inflight_key = "runestone:{acme}:inflight";
    let mut redis = Some(redis);
    let seen = under_load(&gw, TENANT_KEY, || {
        if freeze {
            redis.as_ref().unwrap().freeze();
            std::thread::sleep(Duration::from_millis(700));
            redis.as_ref().unwrap().thaw();
        } else {
            let port = redis.take().unwrap().kill();
            std::thread::sleep(Duration::from_millis(700));
            redis = Some(Redis::start_on(port));
        }
    });
    // Clients saw answers and concurrency refusals only: the outage is the
    // gateway's to absorb.
    let allowed = ["stream 200", "json 200", "stream 429", "json 429"];
    assert!(
        seen.keys().all(|k| allowed.contains(&k.as_str())),
        "{seen:?}"
    );
    assert!(seen.get("json 200").copied().unwrap_or(0) > 10, "{seen:?}");
    assert_consistent(&gw, &seen);
    let redis = redis.unwrap();
    wait_until(
        Duration::from_secs(10),
        "the gateway to see Redis again",
        || metric_value(&gw.metrics(), "runestone_redis_up") == 1.0,
    );
    // No concurrency lease is left taken in Redis once the load is over.
    wait_until(
        Duration::from_secs(10),
        "every Redis lease released",
        || redis.cli(&["ZCARD", inflight_key]).trim() == "0",
    );
    if freeze {
        // Every answer is billed once in Redis: the settlements that timed
        // out during the freeze, and that Redis ran when it thawed, are not
        // counted again by the flush.
        // Every 200 the gateway answered, the checks' own requests included.
        let served = metric_sum(
            &gw.metrics(),
            "runestone_requests_total",
            &["status=\"200\"", "model=\"gpt-4o-mini\""],
        ) as u64;
        let recorded = || {
            let keys = redis.cli(&["KEYS", "runestone:{acme}:usage:*"]);
            let key = keys.lines().next().unwrap_or_default().to_string();
            redis
                .cli(&["HGET", &key, "requests"])
                .trim()
                .parse::<u64>()
                .unwrap_or(0)
        };
        wait_until(Duration::from_secs(10), "the usage to be flushed", || {
            recorded() >= served
        });
        for _ in 0..20 {
            assert_eq!(recorded(), served, "{seen:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn redis_killed_and_restarted_under_load() {
    check_redis_fault(false);
}

#[test]
fn redis_frozen_and_thawed_under_load() {
    check_redis_fault(true);
}
