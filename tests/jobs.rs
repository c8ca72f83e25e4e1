//! Async jobs through real processes (the gateway, runestone-mock,
//! redis-server): one job per idempotency key, attempts with backoff, a
//! time limit per attempt, cancel and list, weighted drain between tenants,
//! and all of it across a `kill -9` of the instance holding the job.

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

const CHAT: &str = "/v1/chat/completions";
const OTHER_KEY: &str = "sk-tenant-other-5555";

/// Tenants `acme` (async jobs, optional callbacks) and `other`; `jobs`
/// settings as YAML flow; Redis when given.
fn config(mock: &Mock, acme_overflow: &str, jobs: &str, redis: Option<&Redis>) -> GatewayConfig {
    let mut config = GatewayConfig::new(mock);
    config.tenants = format!(
        "\n  - id: acme\n    keys: [\"{TENANT_KEY}\"]\n    overflow: {acme_overflow}\n  - id: other\n    keys: [\"{OTHER_KEY}\"]\n    overflow: {{ enabled: true }}\n"
    );
    config.extra =
        format!("pricing:\n  gpt-4o-mini: {{ input: 1.0, output: 2.0 }}\njobs: {jobs}\n");
    if let Some(redis) = redis {
        config.extra += &format!("redis: {{ url: \"{}\", timeout_ms: 250 }}\n", redis.url());
    }
    config
}

/// A client for one gateway instance (by port), so instances started raw
/// (to be killed with SIGKILL) are driven the same way.
struct Client {
    port: u16,
}

impl Client {
    fn of(gw: &Gateway) -> Client {
        Client { port: gw.port }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Submits a chat job; `headers` are added to the tenant's key and
    /// `Prefer: respond-async`.
    fn submit(&self, key: &str, content: &str, headers: &[(&str, &str)]) -> Response {
        let body =
            json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]});
        let auth = format!("Bearer {key}");
        let mut all = vec![
            ("authorization", auth.as_str()),
            ("prefer", "respond-async"),
            ("content-type", "application/json"),
        ];
        all.extend_from_slice(headers);
        call(
            "POST",
            &self.url(CHAT),
            &all,
            Some(body.to_string().as_bytes()),
        )
    }

    /// Submits and expects a new job: its id.
    fn job(&self, key: &str, content: &str) -> String {
        let resp = self.submit(key, content, &[]);
        assert_eq!(resp.status, 202, "{}", String::from_utf8_lossy(&resp.body));
        resp.json()["id"].as_str().unwrap().to_string()
    }

    fn get(&self, key: &str, path: &str) -> Response {
        call(
            "GET",
            &self.url(path),
            &[("authorization", &format!("Bearer {key}"))],
            None,
        )
    }

    fn delete(&self, key: &str, id: &str) -> Response {
        call(
            "DELETE",
            &self.url(&format!("/v1/jobs/{id}")),
            &[("authorization", &format!("Bearer {key}"))],
            None,
        )
    }

    /// Polls the job until it is no longer queued or running.
    fn result(&self, key: &str, id: &str, limit: Duration) -> Response {
        let started = Instant::now();
        loop {
            let resp = self.get(key, &format!("/v1/jobs/{id}"));
            if resp.status != 202 {
                return resp;
            }
            assert!(
                started.elapsed() < limit,
                "job {id} not done within {limit:?}: {}",
                String::from_utf8_lossy(&resp.body)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Submits job `i` with a callback to `port`'s `/hooks/done` and waits
    /// for its result (200).
    fn complete_with_callback(&self, port: u16, i: usize) {
        let callback = format!("http://127.0.0.1:{port}/hooks/done");
        let resp = self.submit(
            TENANT_KEY,
            &format!("with a callback {i}"),
            &[("x-runestone-callback", &callback)],
        );
        let id = resp.json()["id"].as_str().unwrap().to_string();
        let done = self.result(TENANT_KEY, &id, Duration::from_secs(10));
        assert_eq!(done.status, 200, "{}", String::from_utf8_lossy(&done.body));
    }

    /// Polls the job object until `check` holds.
    fn wait_for(&self, key: &str, id: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let mut last = Value::Null;
        wait_until(Duration::from_secs(30), what, || {
            let resp = self.get(key, &format!("/v1/jobs/{id}"));
            last = if resp.status == 202 {
                resp.json()
            } else {
                json!({"status": resp.status})
            };
            check(&last)
        });
        last
    }
}

/// How many requests the provider saw for a job.
fn calls_for(mock: &Mock, id: &str) -> usize {
    let upstream = upstream_id(id);
    mock.requests()
        .iter()
        .filter(|r| r["path"] == CHAT && r["headers"]["x-request-id"] == upstream.as_str())
        .count()
}

fn metric(gw_metrics: &str, outcome: &str) -> f64 {
    metric_value(
        gw_metrics,
        &format!(r#"runestone_jobs_total{{outcome="{outcome}",tenant="acme"}}"#),
    )
}

fn check_one_job_per_key(redis: Option<&Redis>) {
    let mock = Mock::start(&["--latency-ms", "200"]);
    let gw = Gateway::start(&config(&mock, "{ enabled: true }", "{}", redis));
    let client = Client::of(&gw);
    let first = client.submit(TENANT_KEY, "once", &[("idempotency-key", "order-42")]);
    assert_eq!(first.status, 202);
    let id = first.json()["id"].as_str().unwrap().to_string();
    // The client retries its submission (say, after a network error).
    let again = client.submit(TENANT_KEY, "once", &[("idempotency-key", "order-42")]);
    assert!(
        again.status == 202 || again.status == 200,
        "{}",
        again.status
    );
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(
        again.header("location"),
        Some(format!("/v1/jobs/{id}").as_str())
    );
    if again.status == 202 {
        assert_eq!(again.json()["id"], id.as_str());
    }
    // The same key with another request is refused.
    let reused = client.submit(
        TENANT_KEY,
        "something else",
        &[("idempotency-key", "order-42")],
    );
    assert_eq!(
        (reused.status, reused.error_code()),
        (409, "idempotency_key_reused".to_string())
    );
    // Keys are per tenant: the other tenant's same key is its own job.
    let theirs = client.submit(OTHER_KEY, "once", &[("idempotency-key", "order-42")]);
    assert_eq!(theirs.status, 202);
    assert_ne!(theirs.json()["id"], id.as_str());
    // Without Idempotency-Key, the client's own x-request-id is the key.
    let by_id = client.submit(TENANT_KEY, "by id", &[("x-request-id", "client-req-7")]);
    let by_id_again = client.submit(TENANT_KEY, "by id", &[("x-request-id", "client-req-7")]);
    assert_eq!(by_id_again.header("idempotent-replayed"), Some("true"));
    let by_id = by_id.json()["id"].as_str().unwrap().to_string();
    // Bad keys are refused before anything is stored.
    let long = "k".repeat(256);
    let bad = client.submit(TENANT_KEY, "x", &[("idempotency-key", &long)]);
    assert_eq!(
        (bad.status, bad.error_code()),
        (400, "invalid_value".to_string())
    );

    let done = client.result(TENANT_KEY, &id, Duration::from_secs(20));
    assert_eq!(done.status, 200);
    assert_eq!(done.header("x-runestone-job-attempts"), Some("1"));
    assert_eq!(
        client
            .result(TENANT_KEY, &by_id, Duration::from_secs(20))
            .status,
        200
    );
    // Once done, the retried submission answers the job's result.
    let late = client.submit(TENANT_KEY, "once", &[("idempotency-key", "order-42")]);
    assert_eq!(late.status, 200);
    assert_eq!(late.json()["object"], "chat.completion");
    assert_eq!(late.header("idempotent-replayed"), Some("true"));
    assert_eq!(calls_for(&mock, &id), 1, "one provider call for one key");
    assert_eq!(calls_for(&mock, &by_id), 1);
    let metrics = gw.metrics();
    assert_eq!(metric(&metrics, "deduplicated"), 3.0);
    assert_eq!(metric(&metrics, "submitted"), 2.0);
}

#[test]
fn one_job_per_idempotency_key_in_process() {
    check_one_job_per_key(None);
}

#[test]
fn one_job_per_idempotency_key_with_redis() {
    let redis = Redis::start();
    check_one_job_per_key(Some(&redis));
}

fn check_retries_an_outage(redis: Option<&Redis>) {
    let mock = Mock::start(&[]);
    let port = mock.port;
    let gw = Gateway::start(&config(
        &mock,
        "{ enabled: true }",
        "{ retry_backoff_ms: 300, retry_backoff_max_ms: 1000, max_attempts: 20 }",
        redis,
    ));
    let client = Client::of(&gw);
    // The provider goes down before the job runs, and stays down a while.
    drop(mock);
    let id = client.job(TENANT_KEY, "during the outage");
    let waiting = client.wait_for(TENANT_KEY, &id, "a failed attempt and a backoff", |j| {
        j["attempts"].as_u64() >= Some(1) && j["next_attempt_at"].is_u64()
    });
    assert_eq!(waiting["status"], "queued");
    let outage_attempts = waiting["attempts"].as_u64().unwrap();
    let mock = Mock::start_on(port, &[]);
    let done = client.result(TENANT_KEY, &id, Duration::from_secs(60));
    assert_eq!(done.status, 200, "{}", String::from_utf8_lossy(&done.body));
    let attempts: u64 = done
        .header("x-runestone-job-attempts")
        .unwrap()
        .parse()
        .unwrap();
    assert!(attempts > outage_attempts, "{attempts} > {outage_attempts}");
    assert_eq!(calls_for(&mock, &id), 1, "one attempt reached the provider");
    let metrics = gw.metrics();
    assert!(metric(&metrics, "retried") >= 1.0);
    assert_eq!(metric(&metrics, "completed"), 1.0);
    // Billed for what it used: the one answered attempt.
    let usage = client.get(TENANT_KEY, "/v1/usage").json();
    assert!(usage["cost_usd"].as_f64().unwrap() > 0.0, "{usage}");
    // The access log names the job and its attempt (written a moment
    // after the answer).
    let job_line = || {
        gw.log()
            .lines()
            .rfind(|l| {
                l.contains("\"type\":\"access\"")
                    && l.contains(&format!("\"job_attempt\":{attempts}"))
            })
            .map(str::to_string)
    };
    wait_until(Duration::from_secs(5), "the job's access log line", || {
        job_line().is_some()
    });
    let line: Value = serde_json::from_str(&job_line().unwrap()).unwrap();
    assert_eq!(line["job"], id.as_str());
    assert_eq!(line["job_attempt"], attempts);
}

#[test]
fn a_job_outlives_a_provider_outage_in_process() {
    check_retries_an_outage(None);
}

#[test]
fn a_job_outlives_a_provider_outage_with_redis() {
    let redis = Redis::start();
    check_retries_an_outage(Some(&redis));
}

#[test]
fn client_errors_end_a_job_at_once() {
    let mock = Mock::start(&[]);
    let gw = Gateway::start(&config(
        &mock,
        "{ enabled: true }",
        "{ retry_backoff_ms: 100 }",
        None,
    ));
    let client = Client::of(&gw);
    mock.fault(json!({"status": 400, "count": 5}));
    let id = client.job(TENANT_KEY, "bad");
    let done = client.result(TENANT_KEY, &id, Duration::from_secs(20));
    assert_eq!(done.status, 400);
    assert_eq!(done.header("x-runestone-job-attempts"), Some("1"));
    assert_eq!(calls_for(&mock, &id), 1);
    assert_eq!(metric(&gw.metrics(), "retried"), 0.0);
}

fn check_times_out(redis: Option<&Redis>) {
    let mock = Mock::start(&[]);
    let secret = "whsec-0123456789abcdef";
    let (port, received) = callback_receiver(0);
    let overflow = format!(
        "{{ enabled: true, callbacks: {{ allowed_urls: [\"http://127.0.0.1:{port}/hooks/\"], secret: \"{secret}\" }} }}"
    );
    let gw = Gateway::start(&config(
        &mock,
        &overflow,
        "{ timeout_seconds: 1, max_attempts: 3, retry_backoff_ms: 100, retry_backoff_max_ms: 200 }",
        redis,
    ));
    let client = Client::of(&gw);
    // Every attempt stalls far past the job's time limit.
    mock.fault(json!({"stall_ms": 20000, "count": 10}));
    let callback = format!("http://127.0.0.1:{port}/hooks/done");
    let resp = client.submit(TENANT_KEY, "slow", &[("x-runestone-callback", &callback)]);
    assert_eq!(resp.status, 202);
    let id = resp.json()["id"].as_str().unwrap().to_string();
    let done = client.result(TENANT_KEY, &id, Duration::from_secs(30));
    assert_eq!(
        (done.status, done.error_code()),
        (504, "job_timeout".to_string())
    );
    assert_eq!(done.header("x-runestone-job-attempts"), Some("3"));
    assert_eq!(
        calls_for(&mock, &id),
        3,
        "each attempt reached the provider once"
    );
    let (head, body) = received
        .recv_timeout(Duration::from_secs(10))
        .expect("the callback");
    assert!(head.starts_with("POST /hooks/done"), "{head}");
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["status"], "failed");
    assert_eq!(body["response"]["body"]["error"]["code"], "job_timeout");
    assert!(
        received.recv_timeout(Duration::from_secs(2)).is_err(),
        "the callback is delivered once"
    );
    let metrics = gw.metrics();
    assert_eq!(metric(&metrics, "timed_out"), 3.0);
    assert_eq!(metric(&metrics, "retried"), 2.0);
    assert_eq!(metric(&metrics, "failed"), 1.0);
    // Each attempt that reached the provider is billed its prompt.
    let usage = client.get(TENANT_KEY, "/v1/usage").json();
    assert!(usage["prompt_tokens"].as_u64().unwrap() >= 3, "{usage}");
}

#[test]
fn a_job_that_always_times_out_fails_after_its_attempts_in_process() {
    check_times_out(None);
}

#[test]
fn a_job_that_always_times_out_fails_after_its_attempts_with_redis() {
    let redis = Redis::start();
    check_times_out(Some(&redis));
}

fn check_cancel(redis: Option<&Redis>) {
    let mock = Mock::start(&[]);
    let gw = Gateway::start(&config(
        &mock,
        "{ enabled: true }",
        "{ concurrency: 1 }",
        redis,
    ));
    let client = Client::of(&gw);
    mock.fault(json!({"stall_ms": 20000, "count": 1}));
    let running = client.job(TENANT_KEY, "long");
    wait_until(
        Duration::from_secs(10),
        "the job to reach the provider",
        || calls_for(&mock, &running) == 1,
    );
    let queued = client.job(TENANT_KEY, "behind it");
    assert_eq!(
        client.get(TENANT_KEY, &format!("/v1/jobs/{queued}")).json()["status"],
        "queued"
    );
    // Another tenant cannot see or cancel either.
    assert_eq!(client.delete(OTHER_KEY, &queued).status, 404);
    assert_eq!(client.delete(OTHER_KEY, &running).status, 404);
    // A queued job is cancelled at once and never runs.
    let cancelled = client.delete(TENANT_KEY, &queued);
    assert_eq!(cancelled.status, 200);
    assert_eq!(cancelled.json()["status"], "cancelled");
    let gone = client.get(TENANT_KEY, &format!("/v1/jobs/{queued}"));
    assert_eq!(
        (gone.status, gone.error_code()),
        (409, "job_cancelled".to_string())
    );
    // A running job's provider call is cut.
    let started = Instant::now();
    let stopped = client.delete(TENANT_KEY, &running);
    assert_eq!(
        stopped.status,
        200,
        "{}",
        String::from_utf8_lossy(&stopped.body)
    );
    assert_eq!(stopped.json()["status"], "cancelled");
    assert!(started.elapsed() < Duration::from_secs(5));
    // Cancelling again answers the final state.
    assert_eq!(
        client.delete(TENANT_KEY, &running).json()["status"],
        "cancelled"
    );
    // Only the first job ever reached the provider, and its prompt is billed.
    let later = client.job(TENANT_KEY, "after");
    assert_eq!(
        client
            .result(TENANT_KEY, &later, Duration::from_secs(20))
            .status,
        200
    );
    assert_eq!(calls_for(&mock, &queued), 0);
    assert_eq!(calls_for(&mock, &running), 1);
    // Cancelling a finished job changes nothing.
    let finished = client.delete(TENANT_KEY, &later);
    assert_eq!(finished.json()["status"], "completed");
    assert_eq!(metric(&gw.metrics(), "cancelled"), 2.0);
}

#[test]
fn cancels_queued_and_running_jobs_in_process() {
    check_cancel(None);
}

#[test]
fn cancels_queued_and_running_jobs_with_redis() {
    let redis = Redis::start();
    check_cancel(Some(&redis));
}

fn check_list(redis: Option<&Redis>) {
    let mock = Mock::start(&[]);
    let gw = Gateway::start(&config(&mock, "{ enabled: true }", "{}", redis));
    let client = Client::of(&gw);
    let mine: Vec<String> = (0..5)
        .map(|i| {
            let id = client.job(TENANT_KEY, &format!("job {i}"));
            // Distinct submission times, so "newest first" is exact.
            std::thread::sleep(Duration::from_millis(5));
            id
        })
        .collect();
    let theirs = client.job(OTHER_KEY, "not yours");
    for id in &mine {
        assert_eq!(
            client
                .result(TENANT_KEY, id, Duration::from_secs(20))
                .status,
            200
        );
    }
    let mut seen = Vec::new();
    let mut path = "/v1/jobs?limit=2".to_string();
    loop {
        let page = client.get(TENANT_KEY, &path);
        assert_eq!(page.status, 200, "{}", String::from_utf8_lossy(&page.body));
        let page = page.json();
        assert_eq!(page["object"], "list");
        let data = page["data"].as_array().unwrap();
        assert!(data.len() <= 2);
        for job in data {
            assert_eq!(job["object"], "runestone.job");
            assert_eq!(job["status"], "completed");
            assert_eq!(job["model"], "gpt-4o-mini");
            assert_eq!(job["attempts"], 1);
            seen.push(job["id"].as_str().unwrap().to_string());
        }
        if !page["has_more"].as_bool().unwrap() {
            break;
        }
        path = format!(
            "/v1/jobs?limit=2&after={}",
            page["last_id"].as_str().unwrap()
        );
    }
    let newest_first: Vec<String> = mine.iter().rev().cloned().collect();
    assert_eq!(seen, newest_first, "every job once, newest first");
    assert!(!seen.contains(&theirs));
    let completed = client.get(TENANT_KEY, "/v1/jobs?status=completed").json();
    assert_eq!(completed["data"].as_array().unwrap().len(), 5);
    let queued = client.get(TENANT_KEY, "/v1/jobs?status=queued").json();
    assert!(queued["data"].as_array().unwrap().is_empty());
    let other = client.get(OTHER_KEY, "/v1/jobs").json();
    assert_eq!(other["data"].as_array().unwrap().len(), 1);
    for bad in [
        "/v1/jobs?limit=0",
        "/v1/jobs?limit=101",
        "/v1/jobs?status=done",
    ] {
        let resp = client.get(TENANT_KEY, bad);
        assert_eq!(resp.status, 400, "{bad}");
    }
    // Another tenant's job is no cursor of mine.
    let resp = client.get(TENANT_KEY, &format!("/v1/jobs?after={theirs}"));
    assert_eq!(
        (resp.status, resp.json()["error"]["param"].clone()),
        (400, json!("after"))
    );
    assert_eq!(client.get(TENANT_KEY, "/v1/jobs/not-a-job").status, 404);
}

#[test]
fn lists_a_tenants_jobs_with_a_cursor_in_process() {
    check_list(None);
}

#[test]
fn lists_a_tenants_jobs_with_a_cursor_with_redis() {
    let redis = Redis::start();
    check_list(Some(&redis));
}

fn check_weights(redis: Option<&Redis>) {
    let mock = Mock::start(&["--latency-ms", "20"]);
    let mut config = config(
        &mock,
        "{ enabled: true, weight: 3 }",
        "{ concurrency: 1 }",
        redis,
    );
    config.tenants = config.tenants.replace(
        "overflow: { enabled: true }\n",
        "overflow: { enabled: true, weight: 1 }\n",
    );
    let gw = Gateway::start(&config);
    let client = Client::of(&gw);
    // A first job holds the one slot while both tenants fill their queues,
    // however long that takes; it is cancelled (freeing the slot) once they
    // are full.
    mock.fault(json!({"stall_ms": 30000, "count": 1}));
    let holder = client.job(OTHER_KEY, "holder");
    wait_until(Duration::from_secs(10), "the holder to run", || {
        calls_for(&mock, &holder) == 1
    });
    let mut tenant_of = std::collections::HashMap::new();
    for i in 0..24 {
        tenant_of.insert(
            upstream_id(&client.job(TENANT_KEY, &format!("a{i}"))),
            "acme",
        );
        tenant_of.insert(
            upstream_id(&client.job(OTHER_KEY, &format!("b{i}"))),
            "other",
        );
    }
    assert_eq!(client.delete(OTHER_KEY, &holder).status, 200);
    wait_until(
        Duration::from_secs(30),
        "the first 20 jobs after the holder",
        || mock.requests().len() > 20,
    );
    let served: Vec<&str> = mock
        .requests()
        .iter()
        .filter_map(|r| {
            tenant_of
                .get(r["headers"]["x-request-id"].as_str()?)
                .copied()
        })
        .take(20)
        .collect();
    let acme = served.iter().filter(|t| **t == "acme").count() as f64;
    let share = acme / served.len() as f64;
    assert!(
        (share - 0.75).abs() <= 0.075,
        "acme's share {share} of {served:?}, weights 3:1"
    );
}

#[test]
fn the_drain_shares_job_slots_by_weight_in_process() {
    check_weights(None);
}

#[test]
fn the_drain_shares_job_slots_by_weight_with_redis() {
    let redis = Redis::start();
    check_weights(Some(&redis));
}

const JOBS_FOR_CRASHES: &str =
    "{ visibility_timeout_seconds: 2, retry_backoff_ms: 1500, retry_backoff_max_ms: 1500 }";

#[test]
fn jobs_keep_their_key_attempts_and_cancel_across_a_kill_9() {
    let redis = Redis::start();
    let mock = Mock::start(&[]);
    let instance = || config(&mock, "{ enabled: true }", JOBS_FOR_CRASHES, Some(&redis));
    let base = instance();
    let dir = std::env::temp_dir().join(format!("runestone-jobs-crash-{}", std::process::id()));
    let mut doomed = start_raw(&base, &dir.join("a"));
    let a = Client { port: base.port };

    // 1. A job running on the instance when it is killed.
    mock.fault(json!({"stall_ms": 4000, "count": 1}));
    let keyed = a.submit(TENANT_KEY, "keyed", &[("idempotency-key", "crash-1")]);
    assert_eq!(keyed.status, 202);
    let keyed = keyed.json()["id"].as_str().unwrap().to_string();
    wait_until(
        Duration::from_secs(10),
        "the keyed job to reach the provider",
        || calls_for(&mock, &keyed) == 1,
    );
    // 2. A job waiting out a backoff when the instance dies.
    mock.fault(json!({"status": 503, "count": 2, "path": CHAT}));
    let backing_off = a.job(TENANT_KEY, "backing off");
    a.wait_for(TENANT_KEY, &backing_off, "a failed first attempt", |j| {
        j["next_attempt_at"].is_u64()
    });
    doomed.kill().unwrap();
    doomed.wait().unwrap();

    // The same key on another instance finds the job; the job runs again
    // there (a second attempt) and completes; so does the one backing off.
    let survivor = Gateway::start(&instance());
    let b = Client::of(&survivor);
    let again = b.submit(TENANT_KEY, "keyed", &[("idempotency-key", "crash-1")]);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(
        again.header("location"),
        Some(format!("/v1/jobs/{keyed}").as_str())
    );
    let done = b.result(TENANT_KEY, &keyed, Duration::from_secs(30));
    assert_eq!(done.status, 200, "{}", String::from_utf8_lossy(&done.body));
    assert_eq!(done.header("x-runestone-job-attempts"), Some("2"));
    assert_eq!(calls_for(&mock, &keyed), 2);
    let done = b.result(TENANT_KEY, &backing_off, Duration::from_secs(30));
    assert_eq!(done.status, 200);
    let attempts: u32 = done
        .header("x-runestone-job-attempts")
        .unwrap()
        .parse()
        .unwrap();
    assert!(attempts >= 2, "{attempts}");

    // 3. Cancelled through one instance while it runs on another.
    mock.fault(json!({"stall_ms": 20000, "count": 1}));
    let long = b.job(TENANT_KEY, "long");
    wait_until(Duration::from_secs(10), "the long job to run", || {
        calls_for(&mock, &long) == 1
    });
    let canceller = Gateway::start(&instance());
    let c = Client::of(&canceller);
    let stopped = c.delete(TENANT_KEY, &long);
    assert_eq!(
        stopped.status,
        200,
        "{}",
        String::from_utf8_lossy(&stopped.body)
    );
    assert_eq!(stopped.json()["status"], "cancelled");
    assert_eq!(b.get(TENANT_KEY, &format!("/v1/jobs/{long}")).status, 409);

    // 4. Every instance lists the same jobs, newest first.
    let listed = c.get(TENANT_KEY, "/v1/jobs?limit=10").json();
    let ids: Vec<&str> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [long.as_str(), backing_off.as_str(), keyed.as_str()]);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_callback_receiver_that_hangs_holds_no_job_slot() {
    let mock = Mock::start(&[]);
    // Accepts callbacks and never answers them.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            held.push(stream);
        }
    });
    let overflow = callbacks_allowed(port);
    let gw = Gateway::start(&config(&mock, &overflow, "{ concurrency: 1 }", None));
    let client = Client::of(&gw);
    for i in 0..2 {
        client.complete_with_callback(port, i);
    }
    // The one slot is free although both callbacks still hang.
    let started = Instant::now();
    let theirs = client.job(OTHER_KEY, "another tenant");
    assert_eq!(
        client
            .result(OTHER_KEY, &theirs, Duration::from_secs(10))
            .status,
        200
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_callback_on_a_connection_its_receiver_let_go_of_is_sent_again_at_once() {
    let mock = Mock::start(&[]);
    // Answers the first callback on each connection, then closes the
    // connection when the next one comes (a receiver that let it go while
    // it was idle).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let delivered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = delivered.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let count = count.clone();
            std::thread::spawn(move || {
                let mut first = true;
                while let Some(()) = read_one_request(&mut stream) {
                    if !std::mem::take(&mut first) {
                        return;
                    }
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                    if stream.write_all(answer).is_err() {
                        return;
                    }
                }
            });
        }
    });
    let gw = Gateway::start(&config(&mock, &callbacks_allowed(port), "{}", None));
    let client = Client::of(&gw);
    for i in 1..=3 {
        client.complete_with_callback(port, i);
        wait_until(Duration::from_secs(10), "the callback", || {
            delivered.load(std::sync::atomic::Ordering::SeqCst) == i
        });
    }
    let log = gw.log();
    assert!(!log.contains("could not be delivered"), "{log}");
}

/// The overflow section with callbacks allowed to `port`'s `/hooks/`.
fn callbacks_allowed(port: u16) -> String {
    format!(
        "{{ enabled: true, callbacks: {{ allowed_urls: [\"http://127.0.0.1:{port}/hooks/\"], secret: \"whsec-0123456789abcdef\" }} }}"
    )
}

/// Reads one HTTP request (its head and `content-length` body) off
/// `stream`; `None` once it is closed.
fn read_one_request(stream: &mut std::net::TcpStream) -> Option<()> {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).ok().filter(|n| *n > 0)?;
        data.extend_from_slice(&buf[..n]);
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&data[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap_or(0));
            while data.len() < end + 4 + length {
                let n = stream.read(&mut buf).ok().filter(|n| *n > 0)?;
                data.extend_from_slice(&buf[..n]);
            }
            return Some(());
        }
    }
}

#[test]
fn the_end_of_an_attempt_waits_for_redis_to_come_back() {
    let mut redis = Redis::start();
    let mock = Mock::start(&["--latency-ms", "2000"]);
    let gw = Gateway::start(&config(&mock, "{ enabled: true }", "{}", Some(&redis)));
    let client = Client::of(&gw);
    let id = client.job(TENANT_KEY, "across a Redis restart");
    wait_until(
        Duration::from_secs(10),
        "the job to reach the provider",
        || calls_for(&mock, &id) == 1,
    );
    // Redis is down when the provider answers, and back a while later.
    redis.restart_after(|| std::thread::sleep(Duration::from_secs(3)));
    let done = client.result(TENANT_KEY, &id, Duration::from_secs(30));
    assert_eq!(done.status, 200, "{}", String::from_utf8_lossy(&done.body));
    assert_eq!(done.header("x-runestone-job-attempts"), Some("1"));
    assert_eq!(calls_for(&mock, &id), 1, "stored, not run again");
}

#[test]
fn a_submission_redis_did_not_confirm_names_its_job() {
    let redis = Redis::start();
    let mock = Mock::start(&[]);
    let gw = Gateway::start(&config(&mock, "{ enabled: true }", "{}", Some(&redis)));
    let client = Client::of(&gw);
    // Writes wait in Redis past the gateway's timeout, then run.
    redis.cli(&["CLIENT", "PAUSE", "1500", "WRITE"]);
    let resp = client.submit(TENANT_KEY, "unconfirmed", &[("idempotency-key", "slow-1")]);
    assert_eq!(resp.status, 429, "{}", String::from_utf8_lossy(&resp.body));
    let location = resp
        .header("location")
        .unwrap_or_else(|| panic!("no location: {}", String::from_utf8_lossy(&resp.body)))
        .to_string();
    let id = location.strip_prefix("/v1/jobs/").unwrap().to_string();
    assert!(resp.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains(&id));
    // Whether Redis ran it once unpaused (or dropped it with the timed-out
    // connection), the retry with the same key makes it one job.
    redis.cli(&["SET", "runestone:probe", "1"]); // returns once writes run again
    let again = client.submit(TENANT_KEY, "unconfirmed", &[("idempotency-key", "slow-1")]);
    assert!(
        again.status == 202 || again.status == 200,
        "{}",
        again.status
    );
    let final_id = match again.header("idempotent-replayed") {
        Some(_) => {
            assert_eq!(again.header("location"), Some(location.as_str()));
            id
        }
        None => again.json()["id"].as_str().unwrap().to_string(),
    };
    assert_eq!(
        client
            .result(TENANT_KEY, &final_id, Duration::from_secs(20))
            .status,
        200
    );
    let listed = client.get(TENANT_KEY, "/v1/jobs").json();
    assert_eq!(listed["data"].as_array().unwrap().len(), 1, "{listed}");
    let served = mock.requests().iter().filter(|r| r["path"] == CHAT).count();
    assert_eq!(served, 1, "one provider call for one key");
}

#[test]
fn a_jobs_tier_is_checked_again_where_it_runs() {
    // Submitted where `flex` is priced, run (after a failed attempt) by an
    // instance whose config no longer prices it: refused there, as a new
    // request would be, not billed at the standard price.
    let redis = Redis::start();
    let mock = Mock::start(&[]);
    let priced = |tiers: &str| {
        let mut config = config(&mock, "{ enabled: true }", JOBS_FOR_CRASHES, Some(&redis));
        config.extra = config.extra.replace(
            "gpt-4o-mini: { input: 1.0, output: 2.0 }",
            &format!("gpt-4o-mini: {{ input: 1.0, output: 2.0, service_tiers: {tiers} }}"),
        );
        assert!(config.extra.contains("service_tiers"));
        config
    };
    let first = Gateway::start(&priced("{ flex: { input: 0.5, output: 1.0 } }"));
    let a = Client::of(&first);
    // Its first attempt fails (the provider call and its retry).
    mock.fault(json!({"status": 503, "count": 2, "path": CHAT}));
    let body = json!({"model": "gpt-4o-mini", "service_tier": "flex",
        "messages": [{"role": "user", "content": "flex job"}]});
    let auth = format!("Bearer {TENANT_KEY}");
    let submitted = call(
        "POST",
        &a.url(CHAT),
        &[
            ("authorization", auth.as_str()),
            ("prefer", "respond-async"),
            ("content-type", "application/json"),
        ],
        Some(body.to_string().as_bytes()),
    );
    assert_eq!(submitted.status, 202);
    let id = submitted.json()["id"].as_str().unwrap().to_string();
    a.wait_for(TENANT_KEY, &id, "a failed first attempt", |j| {
        j["next_attempt_at"].is_u64()
    });
    drop(first);
    let second = Gateway::start(&priced("{ priority: { input: 2.0, output: 4.0 } }"));
    let b = Client::of(&second);
    let done = b.result(TENANT_KEY, &id, Duration::from_secs(30));
    assert_eq!(done.status, 400, "{}", String::from_utf8_lossy(&done.body));
    let error = &done.json()["error"];
    assert_eq!(error["param"], "service_tier", "{error}");
    assert_eq!(
        calls_for(&mock, &id),
        2,
        "nothing sent for the refused attempt"
    );
    let usage = b.get(TENANT_KEY, "/v1/usage").json();
    assert_eq!(usage["cost_usd"], 0.0, "{usage}");
}
