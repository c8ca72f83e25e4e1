//! Quota taken ahead from Redis (`redis.lease`) through real processes:
//! instances admit against what they took without a round trip, never more
//! than the limits together, give back what they do not use (after
//! `redis.lease.ms`, and when they stop), and bill every request once.

mod common;

use common::*;
use serde_json::Value;
use std::time::{Duration, Instant};

const PRICING: &str = "pricing:\n  gpt-4o-mini: { input: 1.0, output: 2.0, cached_input: 0.5 }\n";

/// A gateway whose tenant `acme` has these limits (YAML flow mapping), on
/// `redis`, with `redis.lease` set to `lease` (YAML, `None` for none).
fn leased(mock: &Mock, limits: &str, redis: &Redis, lease: Option<&str>) -> GatewayConfig {
    let mut config = GatewayConfig::new(mock);
    config.tenants =
        format!("\n  - id: acme\n    keys: [\"{TENANT_KEY}\"]\n    limits: {limits}\n");
    let lease = lease.map_or(String::new(), |l| format!(", lease: {l}"));
    config.extra = format!(
        "{PRICING}redis: {{ url: \"{}\", timeout_ms: 2000{lease} }}\n",
        redis.url()
    );
    config
}

/// Sends `n` chat requests at once; returns their statuses.
fn burst(gw: &Gateway, n: usize) -> Vec<u16> {
    let body = chat("gpt-4o-mini", false);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n)
            .map(|_| scope.spawn(|| gw.post_json("/v1/chat/completions", TENANT_KEY, &body)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap().status)
            .collect()
    })
}

fn admitted(statuses: &[u16]) -> usize {
    statuses.iter().filter(|&&s| s == 200).count()
}

fn one(gw: &Gateway) -> Response {
    gw.post_json(
        "/v1/chat/completions",
        TENANT_KEY,
        &chat("gpt-4o-mini", false),
    )
}

/// Two gateways of tenant `acme` with `limits` on `redis`: one taking
/// quota ahead with `lease`, one deciding every request in Redis.
fn holder_and_other(mock: &Mock, limits: &str, redis: &Redis, lease: &str) -> (Gateway, Gateway) {
    (
        Gateway::start(&leased(mock, limits, redis, Some(lease))),
        Gateway::start(&leased(mock, limits, redis, None)),
    )
}

/// The status of a chat request of tenant `acme` asking for `max_tokens`.
fn ask_tokens(gw: &Gateway, max_tokens: u64) -> u16 {
    let mut body = chat("gpt-4o-mini", false);
    body["max_tokens"] = max_tokens.into();
    gw.post_json("/v1/chat/completions", TENANT_KEY, &body)
        .status
}

fn leased_admissions(gw: &Gateway) -> f64 {
    metric_value(
        &gw.metrics(),
        r#"runestone_leased_admissions_total{tenant="acme"}"#,
    )
}

/// The tenant's usage counters in Redis (the current period's hash).
fn usage_in_redis(redis: &Redis, field: &str) -> String {
    let keys = redis.cli(&["KEYS", "runestone:{acme}:usage:*"]);
    let key = keys.lines().next().unwrap_or_default().to_string();
    redis.cli(&["HGET", &key, field]).trim().to_string()
}

/// Two instances taking half the minute ahead each, in bursts at once:
/// together they admit no more than the limit (what one holds is counted
/// in Redis already), and the provider sees only what was admitted.
#[test]
fn two_leasing_gateways_admit_no_more_than_the_limit() {
    let redis = Redis::start();
    let mock = Mock::start(&[]);
    // 20 a minute: one more every 3 s, counted in what may be admitted.
    let config = leased(
        &mock,
        "{ requests_per_minute: 20 }",
        &redis,
        Some("{ share: 0.25, ms: 5000 }"),
    );
    let gw1 = Gateway::start(&config);
    let gw2 = Gateway::start(&config.another_instance());
    let began = Instant::now();
    // Each takes five more with its first request.
    assert_eq!(one(&gw1).status, 200);
    assert_eq!(one(&gw2).status, 200);
    let (a, b) = std::thread::scope(|scope| {
        let a = scope.spawn(|| burst(&gw1, 15));
        let b = scope.spawn(|| burst(&gw2, 15));
        (a.join().unwrap(), b.join().unwrap())
    });
    let refilled = (began.elapsed().as_millis() / 3000) as usize;
    let total = 2 + admitted(&a) + admitted(&b);
    assert!(total <= 20 + refilled, "{total} admitted of 20 a minute");
    // Each holds at most its share (5) unused.
    assert!(total >= 20 - 2 * 5, "{total} admitted");
    assert_eq!(mock.request_count(), total as u64);
    assert!(leased_admissions(&gw1) >= 1.0 && leased_admissions(&gw2) >= 1.0);
}

/// What one instance took ahead and did not use goes back to Redis after
/// `redis.lease.ms`: another instance (deciding every request in Redis)
/// gets it then, not a minute later.
#[test]
fn quota_held_unused_is_given_back_after_the_lease() {
    let redis = Redis::start();
    let mock = Mock::start(&[]);
    // 4 a minute: one more every 15 s, none within this test.
    let limits = "{ requests_per_minute: 4 }";
    let (holder, other) = holder_and_other(&mock, limits, &redis, "{ share: 0.5, ms: 3000 }");
    let began = Instant::now();
    // One request, and two more taken ahead with it.
    assert_eq!(one(&holder).status, 200);
    let first = burst(&other, 4);
    assert!(
        began.elapsed() < Duration::from_millis(2500),
        "too slow to tell"
    );
    assert_eq!(admitted(&first), 1, "the holder keeps two of the four");
    let mut got = 1;
    let deadline = Instant::now() + Duration::from_secs(10);
    while got < 3 {
        assert!(Instant::now() < deadline, "the held quota never came back");
        match one(&other).status {
            200 => got += 1,
            429 => std::thread::sleep(Duration::from_millis(100)),
            status => panic!("unexpected {status}"),
        }
    }
    assert!(
        began.elapsed() >= Duration::from_millis(2900),
        "given back before the lease ran out"
    );
    assert_eq!(one(&other).status, 429, "the minute is spent");
    assert_eq!(one(&holder).status, 429, "and the holder has nothing left");
    assert_eq!(mock.request_count(), 4);
}

/// A stopping instance gives back what it holds before it exits.
#[test]
fn a_stopping_gateway_gives_back_what_it_holds() {
    let redis = Redis::start();
    let mock = Mock::start(&[]);
    let limits = "{ requests_per_minute: 4 }";
    let (mut holder, other) = holder_and_other(&mock, limits, &redis, "{ share: 0.5, ms: 10000 }");
    assert_eq!(one(&holder).status, 200);
    signal(holder.pid(), "TERM");
    holder.wait_exit(Duration::from_secs(20));
    assert_eq!(admitted(&burst(&other, 5)), 3, "the holder's two came back");
}

/// Slots of requests that end are kept for the instance's next requests
/// (up to its share of `max_concurrent`): across instances no more than the
/// limit run at once, and kept slots are released after the lease.
#[test]
fn kept_slots_hold_concurrency_to_the_limit_across_instances() {
    let redis = Redis::start();
    let mock = Mock::start(&["--latency-ms", "400"]);
    let config = leased(
        &mock,
        "{ max_concurrent: 4 }",
        &redis,
        Some("{ share: 0.5, ms: 4000 }"),
    );
    let gw1 = Gateway::start(&config);
    let gw2 = Gateway::start(&config.another_instance());
    // Each instance runs two at once and keeps both slots.
    assert_eq!(admitted(&burst(&gw1, 2)), 2);
    assert_eq!(admitted(&burst(&gw2, 2)), 2);
    let held = redis.cli(&["ZCARD", "runestone:{acme}:inflight"]);
    assert_eq!(held.trim(), "4", "the kept slots stay held in Redis");
    let before = mock.request_count();
    let (a, b) = std::thread::scope(|scope| {
        let a = scope.spawn(|| burst(&gw1, 6));
        let b = scope.spawn(|| burst(&gw2, 6));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!(admitted(&a), 2, "gw1 runs its two: {a:?}");
    assert_eq!(admitted(&b), 2, "gw2 runs its two: {b:?}");
    assert_eq!(mock.request_count() - before, 4);
    assert!(leased_admissions(&gw1) >= 2.0);
    wait_until(
        Duration::from_secs(10),
        "the kept slots to be released after the lease",
        || redis.cli(&["ZCARD", "runestone:{acme}:inflight"]).trim() == "0",
    );
}

/// Admissions against the pool skip Redis, and every request still reaches
/// Redis's usage once, with its cost; the budget holds on one instance as
/// without leases; the headers stay within the limit.
#[test]
fn leased_admissions_bill_every_request_and_keep_the_budget() {
    let redis = Redis::start();
    let mock = Mock::start(&[]);
    // Each request costs (7 * $1 + 16 * $2) / 1M = $0.000039: the budget
    // admits 26 (the one that crosses it is served).
    let gw = Gateway::start(&leased(
        &mock,
        "{ requests_per_minute: 600, tokens_per_minute: 1000000, max_concurrent: 10, budget_usd: { amount: 0.001, period: daily } }",
        &redis,
        Some("{ share: 0.5, ms: 10000 }"),
    ));
    let mut served = 0;
    let mut remaining = Vec::new();
    loop {
        let resp = one(&gw);
        if resp.status == 429 {
            assert_eq!(resp.error_code(), "insufficient_quota");
            break;
        }
        assert_eq!(resp.status, 200);
        let left: u64 = resp
            .header("x-ratelimit-remaining-requests")
            .unwrap()
            .parse()
            .unwrap();
        assert!(left < 600, "{left}");
        remaining.push(left);
        served += 1;
        assert!(served < 40, "budget never enforced");
    }
    assert_eq!(served, 26);
    // Read at once from the same instance, what it owes Redis counts.
    let usage: Value = gw.get("/v1/usage", Some(TENANT_KEY)).json();
    assert_eq!(usage["requests"], 26, "{usage}");
    assert!(remaining.last() < remaining.first(), "{remaining:?}");
    assert!(
        leased_admissions(&gw) >= 20.0,
        "most admissions skipped Redis"
    );
    wait_until(
        Duration::from_secs(10),
        "every request's usage to reach Redis",
        || usage_in_redis(&redis, "requests") == "26",
    );
    assert_eq!(
        usage_in_redis(&redis, "cost_pusd"),
        (26 * 39_000_000).to_string()
    );
    let usage: Value = gw.get("/v1/usage", Some(TENANT_KEY)).json();
    assert_eq!(usage["requests"], 26);
    assert_eq!(
        metric_value(
            &gw.metrics(),
            r#"runestone_inflight_requests{tenant="acme"}"#
        ),
        0.0
    );
}

/// Redis frozen while an instance admits against its pool: it serves on,
/// and once Redis thaws every request is counted there once (the usage
/// owed is sent again under its batch numbers until Redis confirms it).
#[test]
fn a_frozen_redis_counts_leased_requests_once() {
    let redis = Redis::start();
    let mock = Mock::start(&[]);
    let mut config = leased(
        &mock,
        "{ requests_per_minute: 1000, max_concurrent: 10 }",
        &redis,
        Some("{ share: 0.1, ms: 10000 }"),
    );
    config.extra = config.extra.replace("timeout_ms: 2000", "timeout_ms: 250");
    let gw = Gateway::start(&config);
    for _ in 0..3 {
        assert_eq!(one(&gw).status, 200);
    }
    redis.freeze();
    for _ in 0..5 {
        assert_eq!(one(&gw).status, 200, "served while Redis is frozen");
    }
    redis.thaw();
    wait_until(
        Duration::from_secs(10),
        "every request counted in Redis",
        || usage_in_redis(&redis, "requests") == "8",
    );
    wait_until(Duration::from_secs(10), "Redis to be up", || {
        metric_value(&gw.metrics(), "runestone_redis_up") == 1.0
    });
    // Later flushes send nothing more.
    let after = gw.get("/v1/usage", Some(TENANT_KEY)).json();
    assert_eq!(after["requests"], 8, "{after}");
    assert_eq!(usage_in_redis(&redis, "requests"), "8");
}

/// A request longer than `redis.lease.ms` leaves its slot to the next
/// request as one shorter would: the kept slot goes with a request Redis
/// decides, counted as its own, not as another held.
#[test]
fn a_slot_kept_after_a_long_request_serves_the_next_ones() {
    let redis = Redis::start();
    let mock = Mock::start(&["--latency-ms", "700"]);
    let gw = Gateway::start(&leased(
        &mock,
        "{ max_concurrent: 2 }",
        &redis,
        Some("{ share: 0.5, ms: 300 }"),
    ));
    assert_eq!(one(&gw).status, 200);
    for round in 0..2 {
        assert_eq!(burst(&gw, 2), [200, 200], "round {round}");
    }
    wait_until(Duration::from_secs(10), "the kept slot released", || {
        redis.cli(&["ZCARD", "runestone:{acme}:inflight"]).trim() == "0"
    });
}

/// What an instance holds does not make Redis refuse that instance: a
/// burst of N against an idle limit of N admits exactly N, and a request
/// larger than the pool's tokens is decided against everything but what
/// others hold.
#[test]
fn what_an_instance_holds_is_its_own_to_admit() {
    let redis = Redis::start();
    let mock = Mock::start(&[]);
    let gw = Gateway::start(&leased(
        &mock,
        "{ requests_per_minute: 10 }",
        &redis,
        Some("{ share: 0.5, ms: 10000 }"),
    ));
    assert_eq!(admitted(&burst(&gw, 14)), 10);
    assert_eq!(mock.request_count(), 10);

    let redis = Redis::start();
    let tokens = Gateway::start(&leased(
        &mock,
        "{ tokens_per_minute: 10000 }",
        &redis,
        Some("{ share: 0.5, ms: 10000 }"),
    ));
    assert_eq!(ask_tokens(&tokens, 10), 200);
    assert_eq!(
        ask_tokens(&tokens, 6000),
        200,
        "the pool's 5,000 tokens go back for it"
    );
}

/// On one instance, settlements counted before the client sees the end:
/// clients that send again at once find their slot and see the spend, as
/// without the lease (the budget is passed by the requests in flight when
/// it is crossed, no more).
#[test]
fn one_leasing_instance_frees_slots_and_counts_spend_before_the_answer_ends() {
    let redis = Redis::start();
    let mock = Mock::start(&["--latency-ms", "50"]);
    // Each request costs $0.000039: the budget is crossed by the 26th.
    let gw = Gateway::start(&leased(
        &mock,
        "{ requests_per_minute: 100000, max_concurrent: 2, budget_usd: { amount: 0.001, period: daily } }",
        &redis,
        Some("{ share: 0.5, ms: 10000 }"),
    ));
    let statuses: Vec<Vec<u16>> = std::thread::scope(|scope| {
        let loops: Vec<_> = (0..2)
            .map(|_| {
                scope.spawn(|| {
                    let mut seen = Vec::new();
                    loop {
                        let status = one(&gw).status;
                        seen.push(status);
                        if status != 200 || seen.len() > 40 {
                            return seen;
                        }
                    }
                })
            })
            .collect();
        loops.into_iter().map(|l| l.join().unwrap()).collect()
    });
    let served: usize = statuses.iter().map(|s| admitted(s)).sum();
    for seen in &statuses {
        assert_eq!(seen.last(), Some(&429), "{statuses:?}");
        assert!(seen.iter().all(|&s| s == 200 || s == 429), "{statuses:?}");
    }
    // 26 cross it; the other client's request in flight then may pass.
    assert!((26..=27).contains(&served), "{served}: {statuses:?}");
    assert_eq!(
        metric_value(
            &gw.metrics(),
            r#"runestone_rate_limited_total{limit="concurrency",tenant="acme"}"#
        ),
        0.0,
        "a slot freed before its answer ended"
    );
}

/// Killed a moment after it answered, while Redis does not answer, an
/// instance has written down what it owes: the next one on its pid file
/// pays it, every request billed once.
#[test]
fn a_leasing_gateway_killed_during_an_outage_leaves_its_usage_to_the_next() {
    let redis = Redis::start();
    let mock = Mock::start(&[]);
    let config = leased(
        &mock,
        "{ requests_per_minute: 1000 }",
        &redis,
        Some("{ share: 0.1, ms: 10000 }"),
    );
    let mut gw = Gateway::start(&config);
    assert_eq!(one(&gw).status, 200);
    wait_until(Duration::from_secs(10), "the first counted", || {
        usage_in_redis(&redis, "requests") == "1"
    });
    redis.freeze();
    for _ in 0..5 {
        assert_eq!(one(&gw).status, 200, "admitted against the pool");
    }
    wait_until(Duration::from_secs(5), "the usage written down", || {
        requests_owed_beside(&gw.config_path().1) == 5
    });
    signal(gw.pid(), "KILL");
    gw.wait_exit(Duration::from_secs(10));
    redis.thaw();
    gw.start_again(&config);
    wait_until(Duration::from_secs(10), "the usage paid", || {
        usage_in_redis(&redis, "requests") == "6"
    });
}

/// A slot Redis lost (a failover to a replica that had not seen it, the
/// key deleted) is not used again once renewal finds it gone: instances
/// do not run more than the limit for longer than that.
#[test]
fn a_kept_slot_redis_lost_is_dropped() {
    let redis = Redis::start();
    let mock = Mock::start(&["--latency-ms", "300"]);
    let limits = "{ max_concurrent: 2 }";
    let (holder, other) = holder_and_other(&mock, limits, &redis, "{ share: 0.5, ms: 10000 }");
    assert_eq!(one(&holder).status, 200);
    redis.cli(&["DEL", "runestone:{acme}:inflight"]);
    // Renewal (every 10 s) finds the kept slot gone; from then on the
    // holder's requests need Redis for a slot.
    wait_until(Duration::from_secs(15), "the lost slot dropped", || {
        std::thread::scope(|scope| {
            let a = scope.spawn(|| one(&holder).status);
            let b = scope.spawn(|| burst(&other, 2));
            let (a, b) = (a.join().unwrap(), b.join().unwrap());
            a + b.iter().sum::<u16>() != 600
        })
    });
}

/// While Redis does not answer, what an instance owes counts once in its
/// view of the budget (the gauge, and the in-process fallback's refusals).
#[test]
fn spend_owed_during_an_outage_counts_once() {
    let redis = Redis::start();
    let mock = Mock::start(&[]);
    let mut config = leased(
        &mock,
        "{ requests_per_minute: 100000, budget_usd: { amount: 1.0, period: daily } }",
        &redis,
        Some("{ share: 0.1, ms: 10000 }"),
    );
    config.extra = config.extra.replace("timeout_ms: 2000", "timeout_ms: 200");
    let gw = Gateway::start(&config);
    assert_eq!(one(&gw).status, 200);
    redis.freeze();
    for _ in 0..10 {
        assert_eq!(one(&gw).status, 200);
    }
    // Past the pool's lease, Redis is asked, does not answer, and the
    // in-process fallback decides.
    wait_until(Duration::from_secs(5), "Redis marked down", || {
        one(&gw);
        metric_value(&gw.metrics(), "runestone_redis_up") == 0.0
    });
    let served = mock.request_count() as f64;
    let ratio = metric_value(
        &gw.metrics(),
        r#"runestone_budget_used_ratio{tenant="acme"}"#,
    );
    // $0.000039 a request.
    assert!(
        (ratio - served * 0.000039).abs() < 1e-9,
        "{ratio} for {served} requests"
    );
    redis.thaw();
}

/// Tokens a settlement gives back beyond the instance's share (a large
/// reservation mostly unused) go back to Redis within a quarter lease, not
/// held by the instance until its lease runs out.
#[test]
fn tokens_given_back_beyond_the_share_go_back_to_redis() {
    let redis = Redis::start();
    let mock = Mock::start(&[]);
    let limits = "{ tokens_per_minute: 100000 }";
    let (holder, other) = holder_and_other(&mock, limits, &redis, "{ share: 0.05, ms: 4000 }");
    // Reserves about 90,000 tokens, uses a few dozen.
    assert_eq!(ask_tokens(&holder, 90_000), 200);
    let ended = Instant::now();
    wait_until(Duration::from_secs(10), "the other admitted", || {
        ask_tokens(&other, 50_000) == 200
    });
    assert!(
        ended.elapsed() < Duration::from_millis(3000),
        "held until the lease ran out: {:?}",
        ended.elapsed()
    );
}

/// Quota one instance holds does not age in Redis while it waits to be
/// used: after a quiet spell, what the holder still holds and what the
/// other instance gets from Redis together make the limit's burst, not the
/// burst and the quiet spell's worth (GCRA forgets a request a minute's
/// share after it was counted; a hold is counted from when it is given
/// back, as what of it was used).
#[test]
fn quota_held_does_not_age_while_it_waits() {
    let redis = Redis::start();
    let mock = Mock::start(&[]);
    // 240 a minute (4 a second); the holder takes 60 ahead with its
    // first request and may admit against them for 10 s.
    let limits = "{ requests_per_minute: 240 }";
    let (holder, other) = holder_and_other(&mock, limits, &redis, "{ share: 0.25, ms: 10000 }");
    assert_eq!(one(&holder).status, 200);
    let taken = Instant::now();
    // The quiet spell the test is about: 5 s, 20 requests' worth of the
    // minute. Held quota that aged in Redis would be counted that much
    // less (it was, before holds were kept beside the TATs).
    std::thread::sleep(Duration::from_secs(5));
    let burst_began = Instant::now();
    let others = admitted(&burst(&other, 240));
    let holders = admitted(&burst(&holder, 59));
    let lasted = burst_began.elapsed();
    assert!(
        taken.elapsed() < Duration::from_secs(9),
        "too slow to tell: the hold ran out"
    );
    assert_eq!(holders, 59, "what the holder took stays its own");
    // Within the burst: the limit's burst (the one request before it has
    // come back by now) and what the minute gave meanwhile.
    let allowed = 240 + (lasted.as_millis() / 250) as usize + 1;
    assert!(
        others + holders <= allowed,
        "{others} + {holders} admitted within {lasted:?} of a 240 a minute burst"
    );
    assert!(others + holders >= 235, "{others} + {holders} admitted");
}

/// A hold its instance never gives back (killed) counts until its expiry
/// (twice `redis.lease.ms`, `redis.timeout_ms` and a second), then as
/// used, once: the next admission after it marks it charged (kept for a
/// release that comes late), and it holds nothing further.
#[test]
fn a_killed_holders_hold_counts_as_used_after_its_expiry() {
    let redis = Redis::start();
    let mock = Mock::start(&[]);
    let limits = "{ requests_per_minute: 600 }";
    let (holder, other) = holder_and_other(&mock, limits, &redis, "{ share: 0.5, ms: 1000 }");
    assert_eq!(one(&holder).status, 200);
    let taken = Instant::now();
    let holds = || redis.cli(&["SCARD", "runestone:{acme}:holds"]);
    assert_eq!(holds().trim(), "1", "the holder holds 300");
    drop(holder);
    let first = admitted(&burst(&other, 310));
    let gave = |since: Duration| (since.as_millis() / 100) as usize;
    assert!(
        first <= 299 + gave(taken.elapsed()) + 1,
        "{first} admitted beside the 300 held"
    );
    assert!(
        taken.elapsed() < Duration::from_millis(4900),
        "too slow to tell: the hold expired"
    );
    // Past its expiry (5 s), the next admission counts it as used.
    let deadline = taken + Duration::from_secs(15);
    let mut between = 0;
    let charged = || {
        let members = redis.cli(&["SMEMBERS", "runestone:{acme}:holds"]);
        members.trim().ends_with(",c")
    };
    while !charged() {
        assert!(Instant::now() < deadline, "the hold was never let go");
        between += usize::from(one(&other).status == 200);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        taken.elapsed() >= Duration::from_millis(4900),
        "let go early"
    );
    assert_eq!(holds().trim(), "1", "kept, marked, for a late release");
    // Counted as used, it comes back with the minute (10 a second), not
    // at once: a burst now gets about what the time since gave.
    let second = admitted(&burst(&other, 310));
    let since = taken.elapsed();
    let all = first + between + second;
    assert!(
        all <= 299 + gave(since) + 1,
        "{first}, {between} and {second} admitted within {since:?}"
    );
}

/// Redis's clock, in Unix ms.
fn redis_now(redis: &Redis) -> f64 {
    let time = redis.cli(&["TIME"]);
    let mut parts = time.split_whitespace().map(|p| p.parse::<f64>().unwrap());
    parts.next().unwrap() * 1000.0 + parts.next().unwrap() / 1000.0
}

/// [`holder_and_other`] with holds of half the limit that live 3.25 s
/// unreleased (`ms: 1000`, `timeout_ms: 250`).
fn short_lived_holder_and_other(mock: &Mock, limits: &str, redis: &Redis) -> (Gateway, Gateway) {
    let mut config = leased(mock, limits, redis, Some("{ share: 0.5, ms: 1000 }"));
    config.extra = config.extra.replace("timeout_ms: 2000", "timeout_ms: 250");
    (
        Gateway::start(&config),
        Gateway::start(&leased(mock, limits, redis, None)),
    )
}

/// A killed holder's hold counts as used whole as of its expiry, not as
/// of the admission that finds it expired later: a tenant quiet since
/// has the minute back as the time since gave it.
#[test]
fn a_killed_holders_hold_is_charged_as_of_its_expiry() {
    let redis = Redis::start();
    let mock = Mock::start(&[]);
    // 600 a minute (a request is 100 ms of the minute); a hold of 300.
    let limits = "{ requests_per_minute: 600 }";
    let (holder, other) = short_lived_holder_and_other(&mock, limits, &redis);
    assert_eq!(one(&holder).status, 200);
    drop(holder);
    let member = redis.cli(&["SMEMBERS", "runestone:{acme}:holds"]);
    let fields: Vec<&str> = member.trim().split(',').collect();
    assert_eq!(fields[1..3], ["300", "0"], "{member}");
    let expiry: f64 = fields[3].parse().unwrap();
    // Its expiry: twice `ms`, `timeout_ms` and a second after it was taken.
    wait_until(
        Duration::from_secs(15),
        "3 s past the hold's expiry",
        || redis_now(&redis) > expiry + 3000.0,
    );
    assert_eq!(one(&other).status, 200);
    let tat: f64 = redis
        .cli(&["HGET", "runestone:{acme}:rate", "requests_tat"])
        .trim()
        .parse()
        .unwrap();
    // 300 requests (30 s) from its expiry, then the request (100 ms).
    let expected = expiry + 30_000.0 + 100.0;
    assert!(
        (tat - expected).abs() < 1000.0,
        "requests TAT {tat:.0} where {expected:.0} was expected"
    );
    let marked = redis.cli(&["SMEMBERS", "runestone:{acme}:holds"]);
    assert_eq!(marked.trim(), format!("{},c", member.trim()));
}

/// An instance cut off from Redis past its hold's expiry gives back what
/// it did not use once Redis answers again: the hold was counted as used
/// whole meanwhile, and the late release takes the unused part off.
#[test]
fn a_hold_released_after_an_outage_past_its_expiry_gives_back_the_unused() {
    let redis = Redis::start();
    let mock = Mock::start(&[]);
    // 120 a minute; a hold of 60, living 3.25 s unreleased.
    let limits = "{ requests_per_minute: 120 }";
    let (holder, other) = short_lived_holder_and_other(&mock, limits, &redis);
    assert_eq!(one(&holder).status, 200);
    let taken = Instant::now();
    redis.freeze();
    wait_until(
        Duration::from_secs(10),
        "the holder to see Redis gone",
        || metric_value(&holder.metrics(), "runestone_redis_up") == 0.0,
    );
    // The outage the test is about: past the hold's 3.25 s.
    std::thread::sleep(Duration::from_millis(4500).saturating_sub(taken.elapsed()));
    redis.thaw();
    wait_until(Duration::from_secs(10), "the hold released", || {
        redis.cli(&["SCARD", "runestone:{acme}:holds"]).trim() == "0"
    });
    for gw in [&holder, &other] {
        wait_until(Duration::from_secs(10), "Redis to be up", || {
            metric_value(&gw.metrics(), "runestone_redis_up") == 1.0
        });
    }
    // One request used of the 120 (and the time since gave some back): a
    // hold left charged whole would leave about 60.
    let got = admitted(&burst(&other, 130));
    assert!(got >= 112, "{got} admitted after the outage");
}

/// A request refused only because of what another instance holds, while
/// the minute itself has room, is told when to retry (the held quota
/// counts as taken from now, not from when the minute was last used).
#[test]
fn a_refusal_for_what_others_hold_says_when_to_retry() {
    let redis = Redis::start();
    let mock = Mock::start(&[]);
    // 1000 tokens a minute; the holder takes 50 ahead (3 s of the minute).
    let limits = "{ tokens_per_minute: 1000 }";
    let (holder, other) = holder_and_other(&mock, limits, &redis, "{ share: 0.05, ms: 10000 }");
    assert_eq!(ask_tokens(&holder, 10), 200);
    // The minute's TAT falls more than the hold behind Redis's clock.
    wait_until(Duration::from_secs(15), "the tokens TAT 4 s past", || {
        let tat = redis.cli(&["HGET", "runestone:{acme}:rate", "tokens_tat"]);
        tat.trim().parse::<f64>().unwrap() < redis_now(&redis) - 4000.0
    });
    // About 970 tokens: within the minute, not beside what is held.
    let mut body = chat("gpt-4o-mini", false);
    body["max_tokens"] = 960.into();
    let refused = other.post_json("/v1/chat/completions", TENANT_KEY, &body);
    assert_eq!(refused.status, 429);
    let retry: f64 = refused
        .header("retry-after")
        .expect("a retry-after")
        .parse()
        .unwrap();
    assert!(retry >= 1.0, "retry after {retry}");
    assert_ne!(refused.header("x-should-retry"), Some("false"));
}
