//! Issue #14: each attack an outside tester made, reproduced against the real
//! binaries, with what must happen instead. Tenant isolation of async jobs
//! across reordered restarts, jobs that cannot run failing alone, bounded
//! in-process jobs, crafted bodies, callback URLs, failed-auth throttling
//! behind a proxy, a provider echoing its key, and the smaller ones.

mod common;

use common::*;
use serde_json::{json, Value};
use sha2::Digest;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CHAT: &str = "/v1/chat/completions";
const OTHER_KEY: &str = "sk-tenant-other-5555";

/// Submits an async request (`Prefer: respond-async`); the response.
fn submit_raw(
    gw: &Gateway,
    key: &str,
    path: &str,
    body: &Value,
    extra: &[(&str, &str)],
) -> Response {
    let auth = format!("Bearer {key}");
    let mut headers = vec![
        ("authorization", auth.as_str()),
        ("prefer", "respond-async"),
    ];
    headers.extend_from_slice(extra);
    gw.post_raw(path, &headers, body.to_string().as_bytes())
}

/// Submits an async chat job; its id.
fn submit(gw: &Gateway, key: &str, model: &str) -> String {
    let body = json!({"model": model, "messages": [{"role": "user", "content": "job"}]});
    let resp = submit_raw(gw, key, CHAT, &body, &[]);
    assert_eq!(resp.status, 202, "{}", String::from_utf8_lossy(&resp.body));
    resp.json()["id"].as_str().unwrap().to_string()
}

/// Polls a job until it is done; its final response.
fn result_of(gw: &Gateway, key: &str, id: &str) -> Response {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let resp = gw.get(&format!("/v1/jobs/{id}"), Some(key));
        if resp.status != 202 {
            return resp;
        }
        assert!(Instant::now() < deadline, "job {id} not done in time");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The YAML of a two-tenant gateway on `mock` and `redis`, tenants and models
/// in the given order; `acme` is held at one request a minute when
/// `hold_acme`, so its jobs wait in Redis.
fn two_tenants(
    mock: &Mock,
    redis: &Redis,
    tenants_reversed: bool,
    models: &str,
    acme_models: &str,
    hold_acme: bool,
    callbacks: &str,
) -> GatewayConfig {
    let mut config = GatewayConfig::new(mock);
    let limits = if hold_acme {
        "\n    limits: { requests_per_minute: 1 }"
    } else {
        ""
    };
    let acme = format!(
        "  - id: acme\n    keys: [\"{TENANT_KEY}\"]\n    models: {acme_models}{limits}\n    overflow: {{ enabled: true{callbacks} }}\n"
    );
    let other =
        format!("  - id: other\n    keys: [\"{OTHER_KEY}\"]\n    overflow: {{ enabled: true }}\n");
    config.tenants = if tenants_reversed {
        format!("\n{other}{acme}")
    } else {
        format!("\n{acme}{other}")
    };
    config.models = models.to_string();
    config.extra = format!(
        "redis: {{ url: \"{}\", timeout_ms: 200 }}\njobs: {{ visibility_timeout_seconds: 2 }}\n",
        redis.url()
    );
    config
}

const MODELS_FIRST: &str = "
  - name: gpt-4o-mini
    targets: [{ provider: mock, model: mock-small }]
  - name: same-name
    targets: [{ provider: mock }]
  - name: text-embedding-3-small
    targets: [{ provider: mock }]
";

/// The same models, reordered: the positions of the first config now name
/// other models.
const MODELS_REORDERED: &str = "
  - name: same-name
    targets: [{ provider: mock }]
  - name: text-embedding-3-small
    targets: [{ provider: mock }]
  - name: gpt-4o-mini
    targets: [{ provider: mock, model: mock-small }]
";

/// Jobs held in Redis while acme is at its limit; the gateway is stopped.
fn queue_jobs_then_stop(config: &GatewayConfig, jobs: &[(&str, &str, Value)]) -> Vec<String> {
    let gw = Gateway::start(config);
    // Acme's one request of the minute.
    let first = gw.post_json(CHAT, TENANT_KEY, &chat("gpt-4o-mini", false));
    assert_eq!(first.status, 200);
    let ids = jobs
        .iter()
        .map(|(key, path, body)| {
            let resp = submit_raw(&gw, key, path, body, &[]);
            assert_eq!(resp.status, 202, "{}", String::from_utf8_lossy(&resp.body));
            resp.json()["id"].as_str().unwrap().to_string()
        })
        .collect();
    drop(gw);
    ids
}

#[test]
fn queued_jobs_keep_their_tenant_and_model_across_a_reordered_restart() {
    let redis = Redis::start();
    let mock = Mock::start(&[]);
    let acme_models = "[gpt-4o-mini]";
    let before = two_tenants(&mock, &redis, false, MODELS_FIRST, acme_models, true, "");
    let job = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "job"}]});
    let ids = queue_jobs_then_stop(
        &before,
        &[
            (TENANT_KEY, CHAT, job.clone()),
            (TENANT_KEY, CHAT, job.clone()),
            (TENANT_KEY, CHAT, job),
        ],
    );
    assert!(
        mock.requests().iter().all(|r| !ids
            .iter()
            .any(|id| r["headers"]["x-request-id"] == upstream_id(id).as_str())),
        "the jobs were still queued at the restart"
    );
    // Restart with tenants and models in another order, acme's limit lifted.
    let after = two_tenants(
        &mock,
        &redis,
        true,
        MODELS_REORDERED,
        acme_models,
        false,
        "",
    );
    let gw = Gateway::start(&after);
    for id in &ids {
        let done = result_of(&gw, TENANT_KEY, id);
        assert_eq!(done.status, 200, "{}", String::from_utf8_lossy(&done.body));
        assert_eq!(done.json()["object"], "chat.completion");
        let stolen = gw.get(&format!("/v1/jobs/{id}"), Some(OTHER_KEY));
        assert_eq!(
            (stolen.status, stolen.error_code()),
            (404, "job_not_found".to_string()),
            "the other tenant cannot read acme's job"
        );
    }
    let requests = mock.requests();
    for id in &ids {
        let seen: Vec<&Value> = requests
            .iter()
            .filter(|r| r["headers"]["x-request-id"] == upstream_id(id).as_str())
            .collect();
        assert_eq!(seen.len(), 1, "job {id} ran once");
        assert_eq!(
            seen[0]["model"], "mock-small",
            "job {id} ran as gpt-4o-mini (its provider model), not as the model now at its old position"
        );
    }
    let metrics = gw.metrics();
    assert!(
        metric_sum(
            &metrics,
            "runestone_tokens_total",
            &[r#"tenant="acme""#, r#"model="gpt-4o-mini""#]
        ) > 0.0,
        "billed to acme for gpt-4o-mini"
    );
    assert_eq!(
        metric_sum(&metrics, "runestone_tokens_total", &[r#"tenant="other""#]),
        0.0,
        "nothing billed to the other tenant"
    );
}

#[test]
fn a_job_that_can_no_longer_run_fails_alone_and_the_drain_goes_on() {
    let redis = Redis::start();
    let mock = Mock::start(&[]);
    let (port, callbacks) = callback_receiver(0);
    let hooks = format!(
        ", callbacks: {{ allowed_urls: [\"http://127.0.0.1:{port}/hooks/\"], secret: \"whsec-0123456789abcdef\" }}"
    );
    let before = two_tenants(
        &mock,
        &redis,
        false,
        MODELS_FIRST,
        "[gpt-4o-mini, same-name, text-embedding-3-small]",
        true,
        &hooks,
    );
    let callback_url = format!("http://127.0.0.1:{port}/hooks/done");
    let gw = Gateway::start(&before);
    assert_eq!(
        gw.post_json(CHAT, TENANT_KEY, &chat("gpt-4o-mini", false))
            .status,
        200
    );
    let hook = [("x-runestone-callback", callback_url.as_str())];
    let removed = submit_raw(&gw, TENANT_KEY, CHAT, &chat("same-name", false), &hook);
    let disallowed = submit_raw(
        &gw,
        TENANT_KEY,
        "/v1/embeddings",
        &json!({"model": "text-embedding-3-small", "input": "x"}),
        &hook,
    );
    let fine = submit_raw(&gw, TENANT_KEY, CHAT, &chat("gpt-4o-mini", false), &hook);
    let [removed, disallowed, fine] = [removed, disallowed, fine].map(|r| {
        assert_eq!(r.status, 202);
        r.json()["id"].as_str().unwrap().to_string()
    });
    drop(gw);
    // A job left by an older version, which stored positions: tenant 0,
    // route 99. It must fail, not panic the drain.
    let old = json!({"id": "job_old", "tenant": 0, "route": 99, "endpoint": "chat",
        "body": "{\"model\":\"x\"}", "headers": [], "tokens": 1, "created_ms": 1});
    redis.cli(&[
        "HSET",
        "runestone:{acme}:job:job_old",
        "request",
        &old.to_string(),
        "state",
        "queued",
    ]);
    redis.cli(&["LPUSH", "runestone:{acme}:queue", "a|job_old"]);

    // The operator removes `same-name` and takes embeddings from acme.
    let models = "
  - name: gpt-4o-mini
    targets: [{ provider: mock, model: mock-small }]
  - name: text-embedding-3-small
    targets: [{ provider: mock }]
";
    let after = two_tenants(&mock, &redis, false, models, "[gpt-4o-mini]", false, &hooks);
    let gw = Gateway::start(&after);
    let old = result_of(&gw, TENANT_KEY, "job_old");
    assert_eq!(
        (old.status, old.error_code()),
        (500, "gateway_internal".to_string())
    );
    let gone = result_of(&gw, TENANT_KEY, &removed);
    assert_eq!(
        (gone.status, gone.error_code()),
        (404, "model_not_found".to_string())
    );
    let refused = result_of(&gw, TENANT_KEY, &disallowed);
    assert_eq!(
        (refused.status, refused.error_code()),
        (403, "model_not_allowed".to_string())
    );
    assert_eq!(result_of(&gw, TENANT_KEY, &fine).status, 200);
    // The drain is alive for everyone.
    let later = submit(&gw, OTHER_KEY, "gpt-4o-mini");
    assert_eq!(result_of(&gw, OTHER_KEY, &later).status, 200);
    // Failed jobs' callbacks say so, with the OpenAI-shaped error.
    let mut delivered: Vec<Value> = Vec::new();
    while delivered.len() < 3 {
        let (_, body) = callbacks
            .recv_timeout(Duration::from_secs(15))
            .expect("a callback per job");
        delivered.push(serde_json::from_slice(&body).unwrap());
    }
    let by_id = |id: &str| delivered.iter().find(|d| d["id"] == id).cloned().unwrap();
    assert_eq!(by_id(&removed)["status"], "failed");
    assert_eq!(
        by_id(&removed)["response"]["body"]["error"]["code"],
        "model_not_found"
    );
    assert_eq!(by_id(&disallowed)["response"]["status"], 403);
    assert_eq!(by_id(&fine)["status"], "completed");
    let embeddings = mock.stats()["by_path"]["/v1/embeddings"]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(
        embeddings, 0,
        "the disallowed job never reached the provider"
    );
    assert!(!gw.log().contains("panicked"), "{}", gw.log());
}

#[test]
fn in_process_jobs_expire_and_the_store_is_bounded() {
    let mock = Mock::start(&[]);
    let mut config = GatewayConfig::new(&mock);
    config.tenants = format!(
        "\n  - id: acme\n    keys: [\"{TENANT_KEY}\"]\n    overflow: {{ enabled: true }}\n"
    );
    config.extra =
        "jobs: { result_ttl_seconds: 3, in_process_max_jobs: 2, in_process_max_bytes: 65536 }\n"
            .into();
    let gw = Gateway::start(&config);
    let first = submit(&gw, TENANT_KEY, "gpt-4o-mini");
    let second = submit(&gw, TENANT_KEY, "gpt-4o-mini");
    assert_eq!(result_of(&gw, TENANT_KEY, &first).status, 200);
    assert_eq!(result_of(&gw, TENANT_KEY, &second).status, 200);
    let expired = |id: &str| gw.get(&format!("/v1/jobs/{id}"), Some(TENANT_KEY)).status == 404;
    let full = submit_raw(&gw, TENANT_KEY, CHAT, &chat("gpt-4o-mini", false), &[]);
    assert_eq!(
        (full.status, full.error_code()),
        (503, "job_store_full".to_string())
    );
    assert!(full.header("retry-after").is_some());
    // The results expire after result_ttl_seconds, and room comes back.
    wait_until(Duration::from_secs(10), "the results to expire", || {
        expired(&first) && expired(&second)
    });
    let third = submit(&gw, TENANT_KEY, "gpt-4o-mini");
    assert_eq!(result_of(&gw, TENANT_KEY, &third).status, 200);
    // One job bigger than the byte bound is refused whole.
    let big = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x".repeat(70_000)}]});
    let refused = submit_raw(&gw, TENANT_KEY, CHAT, &big, &[]);
    assert_eq!(
        (refused.status, refused.error_code()),
        (503, "job_store_full".to_string())
    );
}

#[test]
fn crafted_bodies_get_a_400_and_never_strand_a_slot() {
    let redis = Redis::start();
    let mock = Mock::start(&[]);
    let mut config = GatewayConfig::new(&mock);
    config.tenants = format!(
        "\n  - id: acme\n    keys: [\"{TENANT_KEY}\"]\n    limits: {{ max_concurrent: 4 }}\n    overflow: {{ enabled: true }}\n"
    );
    config.extra = redis.section();
    let gw = Gateway::start(&config);
    let deep = format!(
        r#"{{"model":"gpt-4o-mini","api_key":"sk-x","messages":{}1{}}}"#,
        "[".repeat(200),
        "]".repeat(200)
    );
    let bodies = [
        r#"{"model":"gpt-4o-mini","api_key":"sk-x","temperature":1e999,"messages":[]}"#.to_string(),
        r#"{"model":"gpt-4o-mini","base_url":"http://evil","messages":[{"n":-1E400}]}"#.to_string(),
        deep,
    ];
    let auth = format!("Bearer {TENANT_KEY}");
    for body in &bodies {
        for asynchronous in [false, true] {
            let mut headers = vec![("authorization", auth.as_str())];
            if asynchronous {
                headers.push(("prefer", "respond-async"));
            }
            let resp = gw.post_raw(CHAT, &headers, body.as_bytes());
            assert_eq!(
                (resp.status, resp.error_code()),
                (400, "invalid_json".to_string()),
                "{body:.80}"
            );
        }
    }
    // All four slots are free: four requests at once are all served.
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let port = gw.port;
            std::thread::spawn(move || {
                ureq::post(&format!("http://127.0.0.1:{port}{CHAT}"))
                    .set("authorization", &format!("Bearer {TENANT_KEY}"))
                    .send_json(chat("gpt-4o-mini", false))
                    .map(|r| r.status())
                    .unwrap_or_else(|e| match e {
                        ureq::Error::Status(s, _) => s,
                        e => panic!("{e}"),
                    })
            })
        })
        .collect();
    for handle in handles {
        assert_eq!(handle.join().unwrap(), 200);
    }
    assert_eq!(
        redis.cli(&["ZCARD", "runestone:{acme}:inflight"]).trim(),
        "0"
    );
    assert_eq!(
        mock.request_count(),
        4,
        "no crafted body reached the provider"
    );
}

#[test]
fn foreign_fields_are_spliced_out_and_every_other_byte_is_forwarded_as_sent() {
    let mock = Mock::start(&[]);
    let gw = Gateway::start(&GatewayConfig::new(&mock));
    let body = r#"{"model":"same-name", "z":12345678901234567890123,"api_key":"sk-evil","messages":[{"role":"user","content":"hi \u00e9"}],"base_url":"http://evil"}"#;
    let expected = r#"{"model":"same-name", "z":12345678901234567890123,"messages":[{"role":"user","content":"hi \u00e9"}]}"#;
    let resp = gw.post_raw(
        CHAT,
        &[("authorization", &format!("Bearer {TENANT_KEY}"))],
        body.as_bytes(),
    );
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let seen = &mock.requests()[0];
    assert_eq!(
        seen["body_sha256"],
        hex::encode(sha2::Sha256::digest(expected.as_bytes())),
        "only the foreign members were taken out; order, big integers and escapes kept"
    );
}

#[test]
fn callback_urls_are_checked_as_they_will_be_delivered() {
    let mock = Mock::start(&[]);
    let (port, delivered) = callback_receiver(0);
    let mut config = GatewayConfig::new(&mock);
    config.tenants = format!(
        "\n  - id: acme\n    keys: [\"{TENANT_KEY}\"]\n    overflow: {{ enabled: true, callbacks: {{ allowed_urls: [\"http://127.0.0.1:{port}/runestone/\"], secret: \"whsec-0123456789abcdef\" }} }}\n"
    );
    let gw = Gateway::start(&config);
    let base = format!("http://127.0.0.1:{port}/runestone/");
    let tricks = [
        format!("{base}../other"),
        format!("{base}%2e%2e/other"),
        format!("{base}%2E%2e%2Fother"),
        format!("{base}.%2e/other"),
        format!("{base}..\\other"),
        format!("{base}./../../other"),
        format!("{base}x/../../other"),
        format!("http://user:pw@127.0.0.1:{port}/runestone/x"),
        format!("http://127.0.0.1:{port}@127.0.0.1:{port}/runestone/x"),
        format!("{base}x#frag"),
        format!("http://127.0.0.1:{port}/runestonex"),
        format!("https://127.0.0.1:{port}/runestone/x"),
        format!("http://127.0.0.1:1{port}/runestone/x"),
        format!("{base}x%00"),
        format!("{base}..;/admin"),
        format!("{base}.;/admin"),
        format!("{base}%252e%252e/admin"),
        format!("{base}%c0%ae%c0%ae/admin"),
    ];
    for url in &tricks {
        let resp = submit_raw(
            &gw,
            TENANT_KEY,
            CHAT,
            &chat("gpt-4o-mini", false),
            &[("x-runestone-callback", url)],
        );
        assert_eq!(
            (resp.status, resp.error_code()),
            (400, "callback_not_allowed".to_string()),
            "{url}"
        );
    }
    // A tab inside a dot segment, and two callback headers, over a raw socket.
    let body = chat("gpt-4o-mini", false).to_string();
    for headers in [
        format!("X-Runestone-Callback: {base}.\t./other\r\n"),
        format!("X-Runestone-Callback: {base}a\r\nX-Runestone-Callback: {base}b\r\n"),
    ] {
        let request = format!(
            "POST {CHAT} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {TENANT_KEY}\r\nPrefer: respond-async\r\n{headers}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let answer = raw_exchange(gw.port, request.as_bytes(), Duration::from_secs(5));
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains("callback_not_allowed"), "{answer}");
    }
    // The plain URL is delivered, to exactly that path.
    let ok = submit_raw(
        &gw,
        TENANT_KEY,
        CHAT,
        &chat("gpt-4o-mini", false),
        &[("x-runestone-callback", &format!("{base}done?job=1"))],
    );
    assert_eq!(ok.status, 202);
    let (head, _) = delivered.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(
        head.starts_with("POST /runestone/done?job=1 HTTP/1.1"),
        "{head}"
    );
    assert!(
        delivered.recv_timeout(Duration::from_millis(500)).is_err(),
        "nothing else was delivered"
    );
}

#[test]
fn a_valid_key_behind_a_trusted_proxy_is_never_locked_out_by_others_failures() {
    let mock = Mock::start(&[]);
    let mut config = GatewayConfig::new(&mock);
    config.server_extra =
        "  auth_failures_per_minute: 3\n  trusted_proxies: [\"127.0.0.0/8\"]\n".into();
    let gw = Gateway::start(&config);
    let post = |key: &str, forwarded_for: &str| {
        gw.post_raw(
            CHAT,
            &[
                ("authorization", &format!("Bearer {key}")),
                ("x-forwarded-for", forwarded_for),
            ],
            chat("gpt-4o-mini", false).to_string().as_bytes(),
        )
    };
    for _ in 0..3 {
        assert_eq!(post("sk-guess-guess-guess", "203.0.113.9").status, 401);
    }
    let throttled = post("sk-guess-guess-guess", "203.0.113.9");
    assert_eq!(
        (throttled.status, throttled.error_code()),
        (429, "rate_limit_exceeded".to_string())
    );
    // Another client behind the same proxy is its own address.
    assert_eq!(post("sk-guess-guess-guess", "198.51.100.4").status, 401);
    // A valid key is never throttled, from any address.
    assert_eq!(post(TENANT_KEY, "203.0.113.9").status, 200);
    // A client that spoofs the header from outside the trusted range is not
    // believed: here the peer (loopback) is trusted, so the rightmost
    // untrusted hop counts, whatever the client wrote to its left.
    assert_eq!(
        post("sk-guess-guess-guess", "203.0.113.9, 198.51.100.77").status,
        401
    );
    // Two credentials that disagree are refused.
    let both = gw.post_raw(
        CHAT,
        &[
            ("authorization", &format!("Bearer {TENANT_KEY}")),
            ("x-api-key", "sk-someone-else-entirely"),
        ],
        chat("gpt-4o-mini", false).to_string().as_bytes(),
    );
    assert_eq!(
        (both.status, both.error_code()),
        (401, "invalid_api_key".to_string())
    );
    let request = format!(
        "GET /v1/models HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {TENANT_KEY}\r\nAuthorization: Bearer sk-another-one-123\r\nConnection: close\r\n\r\n"
    );
    let answer = raw_exchange(gw.port, request.as_bytes(), Duration::from_secs(5));
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
}

/// Every string in a JSON value, decoded (escapes resolved).
fn strings(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::String(s) => out.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|v| strings(v, out)),
        Value::Object(map) => map.iter().for_each(|(k, v)| {
            out.push(k.clone());
            strings(v, out)
        }),
        _ => {}
    }
}

fn assert_no_key(text: &str, what: &str) {
    assert!(
        !text.contains(PROVIDER_KEY),
        "{what} leaked the key: {text}"
    );
    for line in text.lines() {
        let line = line.strip_prefix("data: ").unwrap_or(line);
        if let Ok(value) = serde_json::from_str::<Value>(line) {
            let mut decoded = Vec::new();
            strings(&value, &mut decoded);
            for s in decoded {
                assert!(
                    !s.contains(PROVIDER_KEY),
                    "{what} leaked the key escaped: {line}"
                );
            }
        }
    }
}

#[test]
fn a_provider_echoing_its_key_never_gets_it_to_a_client() {
    let mock = Mock::start(&["--api-key", PROVIDER_KEY]);
    let (port, callbacks) = callback_receiver(0);
    let mut config = GatewayConfig::new(&mock);
    config.tenants = format!(
        "\n  - id: acme\n    keys: [\"{TENANT_KEY}\"]\n    overflow: {{ enabled: true, callbacks: {{ allowed_urls: [\"http://127.0.0.1:{port}/\"], secret: \"whsec-0123456789abcdef\" }} }}\n"
    );
    let gw = Gateway::start(&config);

    // A JSON answer, and its headers.
    mock.fault(json!({"echo_key": true}));
    let resp = gw.post_json(CHAT, TENANT_KEY, &chat("gpt-4o-mini", false));
    assert_eq!(resp.status, 200);
    assert_no_key(&String::from_utf8_lossy(&resp.body), "a JSON answer");
    for name in [
        "x-upstream-request-id",
        "openai-version",
        "openai-processing-ms",
        "cache-control",
    ] {
        let value = resp.header(name).unwrap_or_default();
        assert!(!value.contains(PROVIDER_KEY), "{name}: {value}");
        assert!(
            value.contains("*****"),
            "{name} was redacted in place: {value}"
        );
    }
    let body = resp.json();
    assert_eq!(body["object"], "chat.completion");
    let content_length: usize = resp.header("content-length").unwrap().parse().unwrap();
    assert_eq!(content_length, resp.body.len(), "the length is kept");

    // A stream, the key split over two chunks and escaped.
    mock.fault(json!({"echo_key": true}));
    let mut events = String::new();
    let status = read_sse(
        gw.port,
        TENANT_KEY,
        &chat("gpt-4o-mini", true),
        |data, _| {
            events.push_str(data);
            events.push('\n');
        },
    );
    assert_eq!(status, 200);
    assert_no_key(&events, "a stream");
    assert!(
        events.contains("[DONE]"),
        "the stream still ends cleanly: {events}"
    );

    // An error answer with the key escaped.
    mock.fault(json!({"error_body": format!("{{\"error\":{{\"message\":\"bad key sk\\u002d{}\"}}}}", &PROVIDER_KEY[3..]), "status": 400, "content_type": "application/json"}));
    let resp = gw.post_json(CHAT, TENANT_KEY, &chat("gpt-4o-mini", false));
    assert_eq!(resp.status, 400);
    assert_no_key(
        &String::from_utf8_lossy(&resp.body),
        "an escaped error body",
    );

    // An error answer passed on keeps the provider's content type, redacted.
    mock.fault(json!({
        "error_body": "{\"error\":{\"message\":\"bad request\",\"type\":\"invalid_request_error\"}}",
        "status": 400,
        "content_type": format!("application/json; key={PROVIDER_KEY}"),
    }));
    let resp = gw.post_json(CHAT, TENANT_KEY, &chat("gpt-4o-mini", false));
    assert_eq!(resp.status, 400);
    let content_type = resp.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("application/json; key=")
            && content_type.contains("*****")
            && !content_type.contains(PROVIDER_KEY),
        "an error's content type: {content_type}"
    );
    assert_eq!(resp.json()["error"]["message"], "bad request");

    // An async job's stored result and its callback.
    mock.fault(json!({"echo_key": true}));
    let resp = submit_raw(
        &gw,
        TENANT_KEY,
        CHAT,
        &chat("gpt-4o-mini", false),
        &[(
            "x-runestone-callback",
            &format!("http://127.0.0.1:{port}/done"),
        )],
    );
    assert_eq!(resp.status, 202);
    let id = resp.json()["id"].as_str().unwrap().to_string();
    let done = result_of(&gw, TENANT_KEY, &id);
    assert_eq!(done.status, 200);
    assert_no_key(&String::from_utf8_lossy(&done.body), "a job result");
    let (_, delivered) = callbacks.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_no_key(&String::from_utf8_lossy(&delivered), "a callback body");
    assert!(!gw.log().contains(PROVIDER_KEY), "the logs");
}

#[test]
fn a_request_parked_because_nothing_could_serve_is_counted_once() {
    let mock = Mock::start(&[]);
    let mut config = GatewayConfig::new(&mock);
    config.tenants = format!(
        "\n  - id: acme\n    keys: [\"{TENANT_KEY}\"]\n    limits: {{ requests_per_minute: 10 }}\n    overflow: {{ enabled: true, max_wait_seconds: 20 }}\n"
    );
    config.providers = vec![format!(
        "  - {{ name: mock, base_url: \"{}\", health_check: {{ path: \"/models\", interval_seconds: 1, unhealthy_threshold: 1, healthy_threshold: 1 }} }}",
        mock.base_url()
    )];
    let gw = Gateway::start(&config);
    wait_until(Duration::from_secs(5), "the first health check", || {
        mock.stats()["by_path"]["/v1/models"].as_u64() > Some(0)
    });
    mock.fault(json!({"status": 503, "count": 2, "path": "/v1/models"}));
    wait_until(
        Duration::from_secs(5),
        "the backend to leave selection",
        || gw.get("/ready", None).status == 503,
    );
    let resp = gw.post_json(CHAT, TENANT_KEY, &chat("gpt-4o-mini", false));
    assert_eq!(resp.status, 200, "parked until the backend came back");
    assert_eq!(
        resp.header("x-ratelimit-remaining-requests"),
        Some("9"),
        "one request of the minute taken, not two"
    );
    let usage = gw.get("/v1/usage", Some(TENANT_KEY)).json();
    assert_eq!(usage["requests"], 1, "{usage}");
}

#[test]
fn smaller_ones_hold() {
    let mock = Mock::start(&[]);
    let config = GatewayConfig::new(&mock);
    let dir = std::env::temp_dir().join(format!(
        "runestone-hardening-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    // The metrics address is taken: /ready says so, and the API serves.
    let taken = std::net::TcpListener::bind(("127.0.0.1", config.metrics_port)).unwrap();
    let path = dir.join("runestone.yaml");
    std::fs::write(&path, config.yaml_in(&dir)).unwrap();
    let (stdout, stderr) = (dir.join("stdout.log"), dir.join("stderr.log"));
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_runestone"))
            .arg("--config")
            .arg(&path)
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{}", config.port);
    wait_ready(
        &format!("{base}/health"),
        &mut child.0,
        Duration::from_secs(20),
        "runestone",
    );
    wait_until(
        Duration::from_secs(5),
        "/ready to report the metrics listener",
        || {
            ureq::get(&format!("{base}/ready"))
                .call()
                .ok()
                .and_then(|r| r.into_json::<Value>().ok())
                .is_some_and(|r| r["checks"]["metrics"]["status"] == "unavailable")
        },
    );
    drop(taken);

    // CL+TE with Connection: close is refused like any CL+TE.
    let smuggle = format!(
        "POST {CHAT} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {TENANT_KEY}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n"
    );
    let answer = raw_exchange(config.port, smuggle.as_bytes(), Duration::from_secs(5));
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(mock.request_count(), 0);
    // On every path, not only the proxied ones.
    let smuggle = "GET /health HTTP/1.1\r\nHost: gw\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    let answer = raw_exchange(config.port, smuggle.as_bytes(), Duration::from_secs(5));
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");

    // A client that closes mid-request is not an error of the gateway's.
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", config.port)).unwrap();
    stream
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n")
        .unwrap();
    drop(stream);
    // Ids are random UUIDs (122 random bits).
    let resp = ureq::get(&format!("{base}/health")).call().unwrap();
    let id = resp.header("x-request-id").unwrap().to_string();
    assert!(is_uuid(&id), "{id}");
    // The writer thread writes its queue every few milliseconds: killed
    // before, the last lines would be lost (a graceful stop flushes them).
    wait_until(
        Duration::from_secs(5),
        "the last request's access line on stdout",
        || std::fs::read_to_string(&stdout).is_ok_and(|out| out.contains(&id)),
    );
    drop(child);

    let out = std::fs::read_to_string(&stdout).unwrap();
    assert!(!out.is_empty());
    for line in out.lines() {
        let line: Value = serde_json::from_str(line)
            .unwrap_or_else(|_| panic!("stdout has only access lines: {line}"));
        assert_eq!(line["type"], "access");
    }
    let err = std::fs::read_to_string(&stderr).unwrap();
    assert!(
        err.contains("runestone starting"),
        "operational logs on stderr: {err}"
    );
    assert!(!err.contains("ERROR Fail to proxy"), "{err}");
    assert!(!err.contains("\u{1b}["), "no colour codes in a log file");

    // Plaintext secrets in a file others can read are warned about.
    use std::os::unix::fs::PermissionsExt;
    let check = |mode: u32| {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_runestone"))
            .args(["check", "--config"])
            .arg(&path)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stderr).unwrap()
    };
    let warned = check(0o644);
    assert!(
        warned.contains("plaintext secrets")
            && warned.contains("providers[0].api_key")
            && warned.contains("tenants[0].keys[0]"),
        "{warned}"
    );
    assert!(!warned.contains(PROVIDER_KEY) && !warned.contains(TENANT_KEY));
    assert!(!check(0o600).contains("plaintext secrets"));
    let _ = std::fs::remove_dir_all(dir);
}

/// A child process killed when the test ends, however it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads a request's head and a body of the declared length; false when
/// the connection ends first.
fn read_request(stream: &mut std::net::TcpStream) -> bool {
    request_bytes(stream).is_some()
}

/// A provider we wrote by hand: each connection to it is handed to
/// `serve` on a thread of its own. Its port.
fn hand_written_provider(serve: impl Fn(std::net::TcpStream) + Clone + Send + 'static) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let serve = serve.clone();
            std::thread::spawn(move || serve(stream));
        }
    });
    port
}

/// One whole request (head and `content-length` body) read off `stream`.
fn request_bytes(stream: &mut std::net::TcpStream) -> Option<Vec<u8>> {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut data = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = stream.read(&mut buf).unwrap_or(0);
        if n == 0 {
            return None;
        }
        data.extend_from_slice(&buf[..n]);
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&data[..end]).to_ascii_lowercase();
            let len = content_length(&head).unwrap_or(0);
            if data.len() >= end + 4 + len {
                return Some(data);
            }
        }
    }
}

/// A provider we wrote by hand, answering every request with `response`
/// and keeping each request's bytes.
fn recording_provider(response: Vec<u8>) -> (u16, std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>) {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    let port = hand_written_provider(move |mut stream| {
        if let Some(request) = request_bytes(&mut stream) {
            record.lock().unwrap().push(request);
            let _ = stream.write_all(&response);
        }
    });
    (port, seen)
}

/// A provider we wrote by hand, answering every request with `response`
/// (raw bytes) and counting them.
fn raw_provider(response: Vec<u8>) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = served.clone();
    let port = hand_written_provider(move |mut stream| {
        if read_request(&mut stream) {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = stream.write_all(&response);
        }
    });
    (port, served)
}

#[test]
fn a_kept_connection_answering_garbage_is_left_for_a_fresh_one() {
    // A provider whose kept connections carry bytes that are no answer
    // (what it sent after its last answer, come in only once the next
    // request went out): each connection's first request is answered,
    // every later one gets garbage.
    let reused = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = reused.clone();
    let port = hand_written_provider(move |mut stream| {
        let body = r#"{"id":"c1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"fresh"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut first = true;
        while read_request(&mut stream) {
            let reply: &[u8] = match std::mem::take(&mut first) {
                true => answer.as_bytes(),
                false => {
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    b"POISON not an answer\r\n\r\n"
                }
            };
            if stream.write_all(reply).is_err() {
                return;
            }
        }
    });
    let mock = Mock::start(&[]);
    let mut config = alone(&mock, "stray", port, "");
    // No attempt to spare: the new connection is not a retry.
    config.extra = "failover: { max_attempts: 1 }\n".into();
    let gw = Gateway::start(&config);
    // Sequential requests: the second and later find the first's
    // connection kept (once it is back in the pool).
    for _ in 0..6 {
        let resp = gw.post_json("/v1/chat/completions", TENANT_KEY, &chat("m", false));
        assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
        assert!(String::from_utf8_lossy(&resp.body).contains("fresh"));
    }
    assert!(
        reused.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "no request went out on a kept connection"
    );
    // Many kept connections at once, every one of them stale: a request
    // whose kept connection failed does not take another from the pool.
    for _ in 0..3 {
        let answers: Vec<_> = std::thread::scope(|scope| {
            let asks: Vec<_> = (0..8)
                .map(|_| {
                    scope.spawn(|| {
                        gw.post_json("/v1/chat/completions", TENANT_KEY, &chat("m", false))
                    })
                })
                .collect();
            asks.into_iter().map(|ask| ask.join().unwrap()).collect()
        });
        for resp in answers {
            assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
            assert_eq!(resp.header("x-runestone-attempts"), Some("1"));
        }
    }
    // Nothing counted against the provider: it stays in service.
    let ready = gw.get("/ready", None);
    assert_eq!(
        ready.status,
        200,
        "{}",
        String::from_utf8_lossy(&ready.body)
    );
}

#[test]
fn a_kept_connection_reset_by_the_provider_is_an_attempt_not_a_silent_resend() {
    // A provider that takes each connection's second request in (it may
    // have worked on it) and then resets the connection (closed with the
    // request unread). Sent again unseen, the request would be done twice
    // whatever `max_attempts` says; it fails as an attempt instead.
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let resets = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (served_count, reset_count) = (served.clone(), resets.clone());
    let port = hand_written_provider(move |mut stream| {
        let body = r#"{"id":"c1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"fresh"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if !read_request(&mut stream) || stream.write_all(answer.as_bytes()).is_err() {
            return;
        }
        served_count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        stream.set_read_timeout(None).unwrap();
        if stream.peek(&mut [0u8; 1]).is_ok_and(|n| n > 0) {
            reset_count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let mock = Mock::start(&[]);
    let mut config = alone(&mock, "resetting", port, "");
    config.extra = "failover: { max_attempts: 1 }\n".into();
    let gw = Gateway::start(&config);
    let first = gw.post_json("/v1/chat/completions", TENANT_KEY, &chat("m", false));
    assert_eq!(
        first.status,
        200,
        "{}",
        String::from_utf8_lossy(&first.body)
    );
    // Once the first answer's connection is back in the pool, the next
    // request takes it and is reset.
    let (mut answered, mut reset) = (1, None);
    for _ in 0..20 {
        let resp = gw.post_json("/v1/chat/completions", TENANT_KEY, &chat("m", false));
        if resp.status != 200 {
            reset = Some(resp);
            break;
        }
        answered += 1;
    }
    let reset = reset.expect("no request went out on a kept connection");
    assert_eq!(
        reset.status,
        502,
        "{}",
        String::from_utf8_lossy(&reset.body)
    );
    // Sent once: no new connection was opened for it.
    let order = std::sync::atomic::Ordering::SeqCst;
    assert_eq!(resets.load(order), 1);
    assert_eq!(served.load(order), answered);
}

#[test]
fn an_answer_that_is_no_http_fails_its_model_only() {
    // One provider account, two models: `broken` is answered with bytes
    // that are no HTTP answer (a head that does not parse, a chunked body
    // whose framing breaks), `fine` with an answer. `broken`'s failures
    // open its own breaker, not the address's: `fine` is still served.
    let body = r#"{"id":"c1","object":"chat.completion","created":1,"model":"fine","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;
    for broken in [
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n{}\r\n".to_string(),
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: abc\r\n\r\n{}".to_string(),
        "POISON not an answer\r\n\r\n".to_string(),
    ] {
        let fine = json_answer("", body.as_bytes());
        let port = hand_written_provider(move |mut stream| {
            while let Some(request) = request_bytes(&mut stream) {
                let answer = if String::from_utf8_lossy(&request).contains("\"model\":\"broken\"") {
                    broken.as_bytes()
                } else {
                    &fine[..]
                };
                if stream.write_all(answer).is_err() {
                    return;
                }
            }
        });
        let mock = Mock::start(&[]);
        let mut config = GatewayConfig::new(&mock);
        config.providers = vec![format!(
            "  - {{ name: acct, base_url: \"http://127.0.0.1:{port}/v1\" }}"
        )];
        config.models = "\n  - name: broken\n    targets: [{ provider: acct, model: broken }]\n  - name: fine\n    targets: [{ provider: acct, model: fine }]\n".into();
        config.tenants = format!("\n  - id: acme\n    keys: [\"{TENANT_KEY}\"]\n");
        config.extra = "circuit_breaker: { consecutive_failures: 2 }\n".into();
        let gw = Gateway::start(&config);
        for _ in 0..4 {
            let resp = gw.post_json("/v1/chat/completions", TENANT_KEY, &chat("broken", false));
            assert_eq!(resp.status / 100, 5, "{}", String::from_utf8_lossy(&resp.body));
        }
        let resp = gw.post_json("/v1/chat/completions", TENANT_KEY, &chat("fine", false));
        assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
        assert_eq!(resp.json()["choices"][0]["message"]["content"], "ok");
    }
}

#[test]
fn a_bodiless_answer_is_not_decoded_whatever_its_encoding_says() {
    // A 204 saying `content-encoding: br` (or zstd, or gzip) has no body to
    // decode: passed on, not taken for a stream cut short.
    for coding in ["br", "zstd", "gzip"] {
        let answer = format!("HTTP/1.1 204 No Content\r\nContent-Encoding: {coding}\r\n\r\n");
        let (port, served) = raw_provider(answer.into_bytes());
        let mock = Mock::start(&[]);
        let gw = Gateway::start(&alone(&mock, "bodiless", port, ""));
        let resp = gw.post_json("/v1/chat/completions", TENANT_KEY, &chat("m", false));
        assert_eq!(
            resp.status,
            204,
            "{coding}: {}",
            String::from_utf8_lossy(&resp.body)
        );
        assert_eq!(
            served.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "{coding}: asked once"
        );
    }
}

#[test]
fn a_provider_answering_no_http_is_not_called_unreachable() {
    let (port, served) = raw_provider(b"POISON not an answer\r\n\r\n".to_vec());
    let mock = Mock::start(&[]);
    let gw = Gateway::start(&alone(&mock, "garbled", port, ""));
    let resp = gw.post_json("/v1/chat/completions", TENANT_KEY, &chat("m", false));
    assert_eq!(resp.status, 502, "{}", String::from_utf8_lossy(&resp.body));
    let message = resp.json()["error"]["message"].to_string();
    assert!(message.contains("not HTTP"), "{message}");
    assert!(!message.contains("reached"), "{message}");
    assert!(served.load(std::sync::atomic::Ordering::SeqCst) >= 1);
}

#[test]
fn a_malformed_body_echoing_the_key_is_not_logged_whatever_the_level() {
    // A refusal whose chunked body echoes the provider's key, then breaks:
    // Pingora's own debug event on the bad chunk prints what it read.
    let echoed = format!("{{\"error\":\"bad key {PROVIDER_KEY}\"}}");
    let response = format!(
        "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{{\r\nZZ\r\n{echoed}\r\n0\r\n\r\n"
    );
    let (port, served) = raw_provider(response.into_bytes());
    let mock = Mock::start(&[]);
    let extra = format!(", api_key: \"{PROVIDER_KEY}\"");
    let config = alone(&mock, "echo", port, &extra);
    let gw = Gateway::start_with_env(&config, &[("RUST_LOG", "trace")]);
    let resp = gw.post_json("/v1/chat/completions", TENANT_KEY, &chat("m", false));
    assert_eq!(resp.status, 502, "{}", String::from_utf8_lossy(&resp.body));
    assert!(served.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    let log = gw.log();
    assert!(log.len() > 100, "the gateway logged at trace level: {log}");
    // Whole, or as Pingora's debug print of a char iterator spells it.
    let spelled: Vec<String> = PROVIDER_KEY.chars().map(|c| format!("'{c}'")).collect();
    for key in [PROVIDER_KEY.to_string(), spelled.join(", ")] {
        assert!(!log.contains(&key), "the key appears in the log: {log}");
    }
    assert!(!String::from_utf8_lossy(&resp.body).contains(PROVIDER_KEY));
}

#[test]
fn a_stream_error_echoing_a_key_with_a_backslash_is_masked_as_the_client_reads_it() {
    // A key with `\n` in it (backslash, n: printable ASCII), echoed as it
    // was sent in a stream's first event, an error: as JSON, those bytes
    // read as a newline, so the message holds no key; written again as
    // JSON for the client, they are the key once more.
    let key = r"sk-test\nKEY-0123456789";
    let event = format!(
        "data: {{\"error\":{{\"message\":\"bad key {key}\",\"type\":\"invalid_request_error\"}}}}\n\n"
    );
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: {}\r\n\r\n{event}",
        event.len()
    );
    let (port, served) = raw_provider(response.into_bytes());
    let mock = Mock::start(&[]);
    let config = alone(
        &mock,
        "echo",
        port,
        r#", api_key: "sk-test\\nKEY-0123456789""#,
    );
    let gw = Gateway::start(&config);
    for stream in [true, false] {
        let resp = gw.post_json("/v1/chat/completions", TENANT_KEY, &chat("m", stream));
        let body = String::from_utf8_lossy(&resp.body).into_owned();
        assert!(served.load(std::sync::atomic::Ordering::SeqCst) >= 1);
        assert_eq!(resp.status, 400, "stream {stream}: {body}");
        assert!(
            !body.contains(key),
            "stream {stream}: the key, as sent: {body}"
        );
        let message = resp.json()["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(
            message.starts_with("bad key "),
            "the provider's message is kept: {message}"
        );
        assert!(!message.contains(key), "the key, as read: {message}");
    }
    assert!(!gw.log().contains(key), "the logs");
}

#[test]
fn provider_errors_written_again_as_json_never_carry_its_key() {
    // Keys with a backslash or a quote of their own, and an error of the
    // provider's that the gateway reads and writes again for the client:
    // an Anthropic error (its message read out of JSON, where `\u000a` is
    // a newline: the key backslash-n is not in that text, and is once the
    // newline is written as JSON again), and a plain-text one (a `"` in
    // it is written `\"` in the client's JSON).
    let cases = [
        (
            r"sk-test\nKEY-0123456789",
            ", kind: anthropic",
            "application/json",
            r#"{"type":"error","error":{"type":"invalid_request_error","message":"bad key sk-test\u000aKEY-0123456789"}}"#,
        ),
        (
            r#"sk-x\"y-0123456789ab"#,
            ", kind: anthropic",
            "application/json",
            r#"{"type":"error","error":{"type":"invalid_request_error","message":"bad key sk-x\u0022y-0123456789ab"}}"#,
        ),
        (
            r#"sk-x\"y-0123456789ab"#,
            "",
            "text/plain",
            r#"bad key sk-x"y-0123456789ab"#,
        ),
    ];
    for (key, kind, content_type, body) in cases {
        let response = format!(
            "HTTP/1.1 400 Bad Request\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let (port, _) = raw_provider(response.into_bytes());
        let mock = Mock::start(&[]);
        let yaml_key = serde_json::to_string(key).unwrap();
        let config = alone(&mock, "echo", port, &format!("{kind}, api_key: {yaml_key}"));
        let gw = Gateway::start(&config);
        let resp = gw.post_json("/v1/chat/completions", TENANT_KEY, &chat("m", false));
        let text = String::from_utf8_lossy(&resp.body).into_owned();
        assert_eq!(resp.status, 400, "{kind} {content_type}: {text}");
        assert!(
            !text.contains(key),
            "{kind} {content_type}: the key: {text}"
        );
        let message = resp.json()["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(
            message.contains("bad key "),
            "the provider's message is kept: {message}"
        );
    }
}

#[test]
fn a_stream_resumed_elsewhere_does_not_take_the_first_providers_key_there() {
    // The first provider streams its key as `\u000a` (which the client
    // reads as a newline: no key in any form it sees) in its id and a
    // delta, then breaks off; the text so far goes to the second as the
    // assistant's message to continue, and the second's events go to the
    // client with the first's id: both written as JSON again, both
    // without the first's key.
    let key = r"sk-test\nKEY-0123456789";
    let first = concat!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n",
        r#"data: {"id":"sk-test\u000aKEY-0123456789","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":"it is sk-test\u000aKEY-0123456789 then"},"finish_reason":null}]}"#,
        "\n\n",
    );
    let (first_port, _) = raw_provider(first.as_bytes().to_vec());
    let rest = concat!(
        r#"data: {"id":"c2","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":" done"},"finish_reason":"stop"}]}"#,
        "\n\n",
        "data: [DONE]\n\n",
    );
    let second = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: {}\r\n\r\n{rest}",
        rest.len()
    );
    let (second_port, seen) = recording_provider(second.into_bytes());
    let mock = Mock::start(&[]);
    let mut config = GatewayConfig::new(&mock);
    config.providers = vec![
        format!(
            "  - {{ name: first, base_url: \"http://127.0.0.1:{first_port}/v1\", api_key: {} }}",
            serde_json::to_string(key).unwrap()
        ),
        format!(
            "  - {{ name: second, base_url: \"http://127.0.0.1:{second_port}/v1\", api_key: \"sk-second-0123456789\", supports_prefill: true }}"
        ),
    ];
    config.models = "\n  - name: m\n    strategy: priority\n    targets: [{ provider: first }, { provider: second }]\n".into();
    config.tenants = format!("\n  - id: acme\n    keys: [\"{TENANT_KEY}\"]\n");
    let gw = Gateway::start(&config);
    let mut events = String::new();
    let status = read_sse(gw.port, TENANT_KEY, &chat("m", true), |data, _| {
        events.push_str(data);
        events.push('\n');
    });
    assert_eq!(status, 200);
    assert!(
        events.contains("[DONE]") && events.contains(" done"),
        "resumed on the second: {events}"
    );
    assert!(
        !events.contains(key),
        "the first provider's key went to the client: {events}"
    );
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1, "one continuation");
    let request = String::from_utf8_lossy(&seen[0]);
    assert!(
        request.contains(r#""content":"it is "#)
            && request.contains(r#" then","role":"assistant""#),
        "continued from the text: {request}"
    );
    assert!(
        !request.contains(key),
        "the first provider's key went to the second: {request}"
    );
}

#[test]
fn a_continuation_passes_on_nothing_with_another_providers_key() {
    // The second provider knows the first's key and writes it where a
    // continuation is passed on unrewritten: in a comment, and in an event
    // too long to hold (over 1 MiB, read unread from the line that takes it
    // past the bound), once before the bound and once across it, each cut
    // between two of its writes. Its own redactor masks its own key only.
    let first_key = "sk-first-0123456789";
    let mut long = br#"data: {"id":"c2","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":""#.to_vec();
    let pad = |long: &mut Vec<u8>, to: usize| long.resize(to, b'x');
    pad(&mut long, 1000);
    long.extend_from_slice(first_key.as_bytes());
    pad(&mut long, (1 << 20) - 5);
    long.extend_from_slice(first_key.as_bytes());
    pad(&mut long, (1 << 20) + 4096);
    long.extend_from_slice(b"\"},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n");
    let cuts = [1000 + 7, (1 << 20) - 5 + 9];
    let port = hand_written_provider(move |mut stream| {
        if read_request(&mut stream) {
            let _ = stream.set_nodelay(true);
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n: {first_key}\n\n"
            );
            let _ = stream.write_all(head.as_bytes());
            let mut at = 0;
            for cut in cuts.into_iter().chain([long.len()]) {
                let _ = stream.write_all(&long[at..cut]);
                let _ = stream.flush();
                at = cut;
            }
        }
    });
    let mock = Mock::start(&[]);
    let gw = Gateway::start(&first_then_second(
        &mock,
        (first_key, "so far"),
        port,
        ", supports_prefill: true",
    ));
    let resp = gw.post_json("/v1/chat/completions", TENANT_KEY, &chat("m", true));
    assert_eq!(resp.status, 200);
    let body = String::from_utf8_lossy(&resp.body);
    assert!(
        body.contains("so far") && body.ends_with("data: [DONE]\n\n") && body.len() > 1 << 20,
        "resumed on the second and passed on whole: {}",
        &body[..body.len().min(400)]
    );
    assert_eq!(
        body.matches(&"*".repeat(first_key.len())).count(),
        3,
        "the comment's and the long event's keys masked where they were"
    );
    assert!(
        !body.contains(first_key),
        "the first provider's key went to the client"
    );
}

#[test]
fn a_continuations_error_quoting_another_providers_key_is_masked() {
    // The first provider breaks off mid-stream; the second answers the
    // continuation with an error event quoting the first's key. The
    // gateway ends the client's stream with an error event of its own
    // that carries the message: masked of every provider's key, not only
    // of the provider that said it.
    let first_key = "sk-first-ABCDEFGH0123456789";
    let second = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\ndata: {{\"error\":{{\"message\":\"invalid {first_key}\",\"type\":\"invalid_request_error\",\"code\":\"bad\"}}}}\n\n"
    );
    let (second_port, _) = raw_provider(second.into_bytes());
    let mock = Mock::start(&[]);
    let gw = Gateway::start(&first_then_second(
        &mock,
        (first_key, "Hello"),
        second_port,
        "",
    ));
    let resp = gw.post_json("/v1/chat/completions", TENANT_KEY, &chat("m", true));
    assert_eq!(resp.status, 200);
    let body = String::from_utf8_lossy(&resp.body);
    assert!(
        body.contains("Hello")
            && body.contains("could not be resumed")
            && body.contains("invalid *"),
        "the stream ended with the continuation's error, its message kept: {body}"
    );
    assert!(
        !body.contains(first_key),
        "the first provider's key went to the client: {body}"
    );
}

#[test]
fn a_refusal_whose_body_never_ends_is_not_waited_for() {
    // A 503 whose body stops short, its connection held open: the gateway
    // reads a refusal's body out to keep the connection, but only what
    // comes at once; the request moves on to the spare, not held until
    // the provider lets go.
    let port = hand_written_provider(move |mut stream| {
        if read_request(&mut stream) {
            let _ = stream.write_all(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"error\":",
            );
            std::thread::sleep(Duration::from_secs(60));
        }
    });
    let mock = Mock::start(&[]);
    let gw = Gateway::start(&behind_a_spare(&mock, "stuck", port, ""));
    // (The client gives up after 30 s: well before the provider does.)
    let resp = gw.post_json("/v1/chat/completions", TENANT_KEY, &chat("m", false));
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    assert_eq!(resp.header("x-runestone-provider"), Some("spare"));
}

/// Model `m` over `first` (a provider we wrote, with the key given, that
/// streams `content` and breaks off) and then `second` (on `second_port`,
/// its own key; `second_extra` goes into its flow mapping): the stream is
/// continued on the second.
fn first_then_second(
    mock: &Mock,
    (first_key, content): (&str, &str),
    second_port: u16,
    second_extra: &str,
) -> GatewayConfig {
    let event = json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": content}, "finish_reason": null}]});
    let first = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\ndata: {event}\n\n"
    );
    let (first_port, _) = raw_provider(first.into_bytes());
    let mut config = GatewayConfig::new(mock);
    config.providers = vec![
        format!(
            "  - {{ name: first, base_url: \"http://127.0.0.1:{first_port}/v1\", api_key: \"{first_key}\" }}"
        ),
        format!(
            "  - {{ name: second, base_url: \"http://127.0.0.1:{second_port}/v1\", api_key: \"sk-second-0123456789\"{second_extra} }}"
        ),
    ];
    config.models = "\n  - name: m\n    strategy: priority\n    targets: [{ provider: first }, { provider: second }]\n".into();
    config.tenants = format!("\n  - id: acme\n    keys: [\"{TENANT_KEY}\"]\n");
    config
}

/// Model `m` over `name` alone, a provider we wrote listening on `port`
/// (`provider_extra` goes into its flow mapping).
fn alone(mock: &Mock, name: &str, port: u16, provider_extra: &str) -> GatewayConfig {
    let mut config = GatewayConfig::new(mock);
    config.providers = vec![format!(
        "  - {{ name: {name}, base_url: \"http://127.0.0.1:{port}/v1\"{provider_extra} }}"
    )];
    config.models = format!("\n  - name: m\n    targets: [{{ provider: {name} }}]\n");
    config.tenants = format!("\n  - id: acme\n    keys: [\"{TENANT_KEY}\"]\n");
    config
}

/// Model `m` over `name`, a provider we wrote listening on `port`
/// (`provider_extra` goes into its flow mapping), first, and the mock as
/// its spare.
fn behind_a_spare(mock: &Mock, name: &str, port: u16, provider_extra: &str) -> GatewayConfig {
    let mut config = GatewayConfig::new(mock);
    config.providers = vec![
        format!("  - {{ name: {name}, base_url: \"http://127.0.0.1:{port}/v1\"{provider_extra} }}"),
        format!("  - {{ name: spare, base_url: \"{}\" }}", mock.base_url()),
    ];
    config.models = format!("\n  - name: m\n    strategy: priority\n    targets: [{{ provider: {name} }}, {{ provider: spare }}]\n");
    config.tenants = format!("\n  - id: acme\n    keys: [\"{TENANT_KEY}\"]\n");
    config
}

fn json_answer(extra_head: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "{extra_head}HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// Events a bulk provider sends at once: 16 MiB, more than the sockets
/// between the gateway and its client hold.
const BULK_EVENTS: usize = 2048;

/// A gateway over a provider sending [`BULK_EVENTS`] at once with a 2 s
/// `total_ms`, the mock as a spare target (resumption on), and a breaker
/// that opens at one failure.
fn bulk_behind_a_spare(total_ms: u64, server_extra: &str) -> (Mock, Gateway) {
    let text = "a".repeat(8 * 1024);
    let mut response =
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n".to_vec();
    let event = json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                       "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]});
    for _ in 0..BULK_EVENTS {
        response.extend_from_slice(format!("data: {event}\n\n").as_bytes());
    }
    response.extend_from_slice(b"data: [DONE]\n\n");
    let (port, _) = raw_provider(response);
    let mock = Mock::start(&[]);
    let mut config = behind_a_spare(
        &mock,
        "bulk",
        port,
        &format!(", timeouts: {{ total_ms: {total_ms} }}"),
    );
    config.extra = "circuit_breaker: { consecutive_failures: 1 }\n".into();
    config.server_extra = server_extra.into();
    (mock, Gateway::start(&config))
}

/// Asks `port` for a stream over a raw connection (reads time out after
/// 20 s), for a client that reads at its own pace.
fn ask_for_a_stream(port: u16) -> std::net::TcpStream {
    ask_for(port, true)
}

/// Asks model `m` for an answer (`stream`ed or not) on a raw connection,
/// left unread.
fn ask_for(port: u16, stream: bool) -> std::net::TcpStream {
    ask_on(
        std::net::TcpStream::connect(("127.0.0.1", port)).unwrap(),
        stream,
    )
}

/// A connection to `port` with a receive buffer of `bytes` from the start
/// (so the window it offers is small from its handshake on).
fn connect_with_receive_buffer(port: u16, bytes: usize) -> std::net::TcpStream {
    use nix::sys::socket::{self, sockopt::RcvBuf, AddressFamily, SockFlag, SockType, SockaddrIn};
    use std::os::fd::AsRawFd;
    let fd = socket::socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .unwrap();
    socket::setsockopt(&fd, RcvBuf, &bytes).unwrap();
    let to = SockaddrIn::from(std::net::SocketAddrV4::new(
        std::net::Ipv4Addr::LOCALHOST,
        port,
    ));
    socket::connect(fd.as_raw_fd(), &to).unwrap();
    std::net::TcpStream::from(fd)
}

/// [`ask_for`] on `conn`.
fn ask_on(conn: std::net::TcpStream, stream: bool) -> std::net::TcpStream {
    let body =
        json!({"model": "m", "stream": stream, "messages": [{"role": "user", "content": "hi"}]});
    post_chat_on(conn, &body)
}

/// Posts `body` to the chat endpoint on `conn` (reads time out after
/// 20 s), the answer left unread.
fn post_chat_on(mut conn: std::net::TcpStream, body: &Value) -> std::net::TcpStream {
    let body = body.to_string();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    write!(
        conn,
        "POST {CHAT} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {TENANT_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    conn
}

#[test]
fn a_client_that_stops_taking_its_answer_is_cut_after_the_send_timeout() {
    // An 8 MiB JSON answer, more than the sockets hold. A client that stops
    // reading after the first bytes is cut once a write has waited the
    // send timeout (it used to hold its connection and task for as long as
    // it liked); one that reads steadily but slower than the gateway
    // writes gets all of it: the answer goes out in pieces that each have
    // the whole timeout, and more while the client takes some of it.
    let content = "lorem ".repeat(8 * 1024 * 1024 / 6);
    let answer = json!({
        "id": "c", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
    })
    .to_string();
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        answer.len()
    );
    let (provider, _) = staged_provider(vec![format!("{head}{answer}")], Then::Linger);
    let mock = Mock::start(&[]);
    let mut config = alone(&mock, "big", provider, "");
    config.server_extra = "  client_send_timeout_seconds: 1\n".into();
    let gw = Gateway::start(&config);
    let small_window = |conn: &std::net::TcpStream| {
        use nix::sys::socket::{setsockopt, sockopt::RcvBuf};
        setsockopt(conn, RcvBuf, &(256 * 1024)).unwrap();
    };

    let mut stuck = ask_for(gw.port, false);
    small_window(&stuck);
    let mut first = [0u8; 1024];
    assert!(stuck.read(&mut first).unwrap() > 0);
    let asked = Instant::now();
    let timeouts = || metric_value(&gw.metrics(), "runestone_client_send_timeouts_total");
    wait_until(Duration::from_secs(10), "the stuck client cut", || {
        timeouts() == 1.0
    });
    let cut_after = asked.elapsed();
    let mut rest = Vec::new();
    let _ = stuck.read_to_end(&mut rest);
    assert!(
        1024 + rest.len() < answer.len(),
        "the client was sent all of it: {} bytes",
        1024 + rest.len()
    );
    assert!(
        cut_after < Duration::from_secs(5),
        "cut {cut_after:?} after it stopped reading"
    );

    let mut steady = ask_for(gw.port, false);
    small_window(&steady);
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    // Where the body begins, and its length, once the head is in.
    let mut body = None;
    let reading = Instant::now();
    let body_at = loop {
        match steady.read(&mut buf) {
            Ok(0) => panic!("closed after {} bytes", got.len()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!("after {} bytes: {e}", got.len()),
        }
        if body.is_none() {
            let head = String::from_utf8_lossy(&got);
            body = head
                .find("\r\n\r\n")
                .map(|end| (end + 4, content_length(&head[..end]).unwrap()));
        }
        if let Some((at, length)) = body.filter(|(at, length)| got.len() >= at + length) {
            assert_eq!(got.len(), at + length);
            break at;
        }
        // At 1 MiB/s: the 4 MiB the gateway's socket holds beyond what was
        // taken would take four seconds to go as one write, and the kernel
        // wakes a waiting writer only once much of it drained (seconds).
        let due = Duration::from_secs_f64(got.len() as f64 / (1024.0 * 1024.0));
        std::thread::sleep(due.saturating_sub(reading.elapsed()));
    };
    assert!(got.starts_with(b"HTTP/1.1 200"));
    let body: Value = serde_json::from_slice(&got[body_at..]).expect("the whole answer");
    assert_eq!(body["choices"][0]["message"]["content"], content);
    assert_eq!(timeouts(), 1.0, "the steady reader was not cut");

    // One that trickles (the smallest receive buffer, read out every
    // 0.9 s: a few hundred bytes a second) counts as stopped: else it would
    // hold its answer for hours.
    let mut trickling = ask_on(connect_with_receive_buffer(gw.port, 0), false);
    let asked = Instant::now();
    let mut crumb = vec![0u8; 64 * 1024];
    while timeouts() < 2.0 && asked.elapsed() < Duration::from_secs(10) {
        if matches!(trickling.read(&mut crumb), Ok(0) | Err(_)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(900));
    }
    wait_until(Duration::from_secs(5), "the trickling client cut", || {
        timeouts() == 2.0
    });
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "cut {:?} after it asked",
        asked.elapsed()
    );
}

/// A gateway in front of a mock (model `m`), with a response cache
/// roomy enough for the cache tests' 9 MB streams (more than the sockets
/// hold; under the 16 MiB a flight keeps for its followers) and a send
/// timeout of one second.
fn cached_with_a_short_send_timeout() -> (Mock, Gateway) {
    let mock = Mock::start(&[]);
    let mut config = GatewayConfig::new(&mock);
    config.models = "\n  - name: m\n    targets: [{ provider: mock, model: mock-small }]\n".into();
    config.tenants = format!("\n  - id: acme\n    keys: [\"{TENANT_KEY}\"]\n");
    config.extra = "cache: { max_entry_bytes: 67108864 }\n".into();
    config.server_extra = "  client_send_timeout_seconds: 1\n".into();
    let gw = Gateway::start(&config);
    (mock, gw)
}

#[test]
fn a_cache_leader_that_stops_reading_does_not_cut_the_answer_its_followers_share() {
    // Two identical deterministic streams share one provider call. The
    // first client stops reading: it is cut at the send timeout, but the
    // call goes on for the second, which gets all of it (the copy took the
    // timeout for its own and cut both, as the provider's broken stream).
    let (mock, gw) = cached_with_a_short_send_timeout();
    // The answer waits a second: time for the second request to join.
    mock.fault(json!({"first_token_ms": 1000, "count": 1, "path": "/v1/chat/completions"}));
    let body = json!({"model": "m", "stream": true, "temperature": 0, "mock_tokens": 40000,
                      "max_tokens": 40000, "messages": [{"role": "user", "content": "shared"}]});
    let (port, request) = (gw.port, body.clone());
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let leader = std::thread::spawn(move || {
        let conn = connect_with_receive_buffer(port, 64 * 1024);
        let _conn = post_chat_on(conn, &request);
        // Holds the connection, unread, until the test is done.
        let _ = stopped.recv_timeout(Duration::from_secs(60));
    });
    wait_until(Duration::from_secs(10), "the shared call", || {
        mock.request_count() == 1
    });
    let (status, events) = sse_events(gw.port, CHAT, TENANT_KEY, &body);
    let _ = stop.send(());
    leader.join().unwrap();
    assert_eq!(status, 200);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert!(!events.iter().any(|e| e.contains("\"error\"")));
    assert!(events.len() > 40_000, "{} events", events.len());
    assert_eq!(mock.request_count(), 1, "one provider call");
    let metrics = gw.metrics();
    assert_eq!(
        metric_value(
            &metrics,
            r#"runestone_cache_total{model="m",outcome="coalesced",tenant="acme"}"#
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        metric_value(&metrics, "runestone_client_send_timeouts_total"),
        1.0,
        "the first client was cut"
    );
    assert!(!metrics.contains("provider_stream_broken"), "{metrics}");
}

#[test]
fn a_cache_leader_read_steadily_but_slowly_is_not_cut() {
    // A deterministic stream (one that others could follow) of 9 MB, read
    // at 1 MiB/s with a send timeout of one second: its sends wait longer
    // than that, but the client keeps taking, so it gets all of it.
    let (_mock, gw) = cached_with_a_short_send_timeout();
    let body = json!({"model": "m", "stream": true, "temperature": 0, "mock_tokens": 40000,
                      "max_tokens": 40000, "messages": [{"role": "user", "content": "slowly"}]});
    let mut conn = post_chat_on(connect_with_receive_buffer(gw.port, 256 * 1024), &body);
    let (mut got, mut buf, reading) = (Vec::new(), vec![0u8; 64 * 1024], Instant::now());
    // Until the body's last chunk, or a cut.
    while !got.ends_with(b"\r\n0\r\n\r\n") {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
        let due = Duration::from_secs_f64(got.len() as f64 / (1024.0 * 1024.0));
        std::thread::sleep(due.saturating_sub(reading.elapsed()));
    }
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.contains("data: [DONE]"),
        "cut after {} bytes",
        got.len()
    );
    assert!(got.len() > 8_000_000, "{} bytes", got.len());
    let timeouts = metric_value(&gw.metrics(), "runestone_client_send_timeouts_total");
    assert_eq!(timeouts, 0.0);
}

#[test]
fn a_stream_whose_total_timeout_runs_out_on_a_slow_client_is_not_the_providers_failure() {
    // The client stops reading at the first event until well past the
    // provider's total timeout, so the time runs out while the gateway
    // waits to send. The stream is cut there (not when the client reads
    // again), billed for what it carried; neither the breaker (opening at
    // one failure) nor resumption (on, with another target) takes it for
    // the provider's failure: else any slow reader would cut a provider
    // off for every tenant, and be served twice.
    let (mock, gw) = bulk_behind_a_spare(2000, "");
    cut_while_it_sleeps(&mock, &gw);
}

#[test]
fn a_stream_whose_client_stops_reading_is_cut_at_the_send_timeout_before_its_total() {
    // As above, but the stream has a minute left when its client stops
    // reading: the send timeout (one second here) cuts it.
    let (mock, gw) = bulk_behind_a_spare(60_000, "  client_send_timeout_seconds: 1\n");
    cut_while_it_sleeps(&mock, &gw);
}

/// A raw client asks `gw` for the bulky stream and sleeps 8 s at its first
/// bytes: the stream is cut while it sleeps, as the client's doing.
fn cut_while_it_sleeps(mock: &Mock, gw: &Gateway) {
    let (port, request) = (gw.port, Instant::now());
    let client = std::thread::spawn(move || {
        let mut conn = ask_for_a_stream(port);
        let mut answer = vec![0; 4096];
        let first = conn.read(&mut answer).unwrap();
        answer.truncate(first);
        std::thread::sleep(Duration::from_secs(8).saturating_sub(request.elapsed()));
        let _ = conn.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    });
    // The request ends at the timeout (and a second's grace for the last
    // writes), not when the client reads again.
    wait_until(Duration::from_secs(6), "the cut to be counted", || {
        metric_value(
            &gw.metrics(),
            r#"runestone_errors_total{reason="client_too_slow"}"#,
        ) == 1.0
    });
    assert!(
        request.elapsed() < Duration::from_secs(8),
        "while the client slept"
    );
    let answer = client.join().unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{}", &answer[..200]);
    // Cut off: no `[DONE]`, no error event (a client not reading cannot be
    // told), and no last chunk, so an SDK raises at the truncated body.
    let events = answer.matches("data: ").count();
    assert!(
        events > 1 && events < BULK_EVENTS,
        "cut at the timeout: {events} events"
    );
    assert!(!answer.contains("[DONE]") && !answer.contains(r#""error""#));
    assert!(
        !answer.ends_with("\r\n0\r\n\r\n"),
        "{:?}",
        &answer[answer.len() - 100..]
    );
    let metrics = gw.metrics();
    assert_eq!(
        metric_sum(&metrics, "runestone_circuit_state", &[r#"provider="bulk""#]),
        0.0,
        "the breaker stays closed"
    );
    assert!(
        metric_sum(
            &metrics,
            "runestone_tokens_total",
            &[r#"kind="completion""#]
        ) > 0.0,
        "billed for what it carried"
    );
    assert_eq!(mock.request_count(), 0, "not continued on the other target");
    assert_eq!(
        metric_value(&metrics, "runestone_client_send_timeouts_total"),
        1.0
    );
}

#[test]
fn a_stream_its_client_reads_slower_than_the_provider_writes_is_told_so_in_band() {
    // The client reads steadily (16 KiB every 10 ms), slower than the
    // provider sent: no send waits a second, but the copy waits on the
    // client for more than a second in all. At the timeout the stream ends with an in-band
    // error that says so; the provider is not blamed nor the stream
    // continued elsewhere.
    let (mock, gw) = bulk_behind_a_spare(2000, "");
    told_it_was_slow(&mock, &gw, Duration::from_millis(10));
}

#[test]
fn a_stream_read_steadily_but_slower_than_a_send_may_wait_is_not_cut() {
    // As above at 800 KB/s, with a send timeout of three seconds: a send
    // at the deadline waits longer than the second it is given there (the
    // kernel wakes the writer only once much of a 4 MB buffer drained),
    // but the client took some of it meanwhile, so it is slow, not stuck:
    // told so once that send is out, not cut.
    let (mock, gw) = bulk_behind_a_spare(4000, "  client_send_timeout_seconds: 3\n");
    told_it_was_slow(&mock, &gw, Duration::from_millis(20));
    let metrics = gw.metrics();
    assert_eq!(
        metric_value(&metrics, "runestone_client_send_timeouts_total"),
        0.0
    );
}

/// A raw client reads the bulky stream 16 KiB at a time, pausing `pause`
/// after each read: it is told in-band that it was too slow.
fn told_it_was_slow(mock: &Mock, gw: &Gateway, pause: Duration) {
    let mut conn = ask_for_a_stream(gw.port);
    let (mut answer, mut piece) = (Vec::new(), vec![0; 16 * 1024]);
    loop {
        match conn.read(&mut piece) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&piece[..n]),
        }
        if answer.ends_with(b"\r\n0\r\n\r\n") {
            break;
        }
        std::thread::sleep(pause);
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.ends_with("\r\n0\r\n\r\n"),
        "a clean end, not a cut: {}",
        gw.log()
            .lines()
            .filter(|l| l.contains("WARN"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let last = answer.rsplit("data: ").next().unwrap();
    assert!(!answer.contains("[DONE]"), "cut at the timeout");
    assert!(
        last.contains(r#""code":"upstream_timeout""#) && last.contains("slow to read"),
        "{}",
        &last[..last.len().min(300)]
    );
    wait_until(Duration::from_secs(5), "the cut to be counted", || {
        metric_value(
            &gw.metrics(),
            r#"runestone_errors_total{reason="client_too_slow"}"#,
        ) == 1.0
    });
    let metrics = gw.metrics();
    assert_eq!(
        metric_sum(&metrics, "runestone_circuit_state", &[r#"provider="bulk""#]),
        0.0,
        "the breaker stays closed"
    );
    assert_eq!(mock.request_count(), 0, "not continued on the other target");
}

#[test]
fn an_answer_the_provider_cuts_short_reaches_the_client_cut_short() {
    // Audio passes at once, chunked: the provider sends one chunk and
    // closes without the last one.
    let (cut, _) = raw_provider(
        b"HTTP/1.1 200 OK\r\nContent-Type: audio/mpeg\r\nTransfer-Encoding: chunked\r\n\
          Connection: close\r\n\r\n10\r\n0123456789abcdef\r\n"
            .to_vec(),
    );
    let mock = Mock::start(&[]);
    let mut config = GatewayConfig::new(&mock);
    config.providers = vec![format!(
        "  - {{ name: cut, base_url: \"http://127.0.0.1:{cut}/v1\" }}"
    )];
    config.models = "\n  - name: tts\n    targets: [{ provider: cut }]\n".into();
    config.tenants = format!("\n  - id: acme\n    keys: [\"{TENANT_KEY}\"]\n");
    let gw = Gateway::start(&config);
    // What the provider sent decides, not the request's `stream`: audio
    // asked for as a stream gets no event stream's in-band error either.
    for stream in [false, true] {
        let body = json!({"model": "tts", "input": "hello", "voice": "alloy", "stream": stream});
        let body = body.to_string();
        let request = format!(
            "POST /v1/audio/speech HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {TENANT_KEY}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let answer = raw_exchange(gw.port, request.as_bytes(), Duration::from_secs(10));
        let (head, rest) = answer.split_once("\r\n\r\n").expect("a head");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let head = head.to_ascii_lowercase();
        assert!(head.contains("transfer-encoding: chunked"), "{head}");
        assert!(rest.contains("0123456789abcdef"), "{rest:?}");
        // No last chunk: the client knows the audio is not whole.
        assert!(!rest.ends_with("0\r\n\r\n"), "stream {stream}: {rest:?}");
        assert!(!rest.contains("data:"), "stream {stream}: {rest:?}");
    }
}

#[test]
fn informational_and_compressed_answers_are_handled_not_passed_on() {
    let chat_body = br#"{"id":"c","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;
    // 103 Early Hints, then the answer.
    let (hints, _) = raw_provider(json_answer(
        "HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n",
        chat_body,
    ));
    // An answer compressed although identity was asked for, and cut short:
    // it does not decode (tests/openai_surface.rs has the ones that do).
    let mut gzip = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\nContent-Length: 4\r\nConnection: close\r\n\r\n".to_vec();
    gzip.extend_from_slice(b"\x1f\x8b\x08\x00");
    let (compressed, compressed_served) = raw_provider(gzip);
    let mock = Mock::start(&[]);
    let mut config = GatewayConfig::new(&mock);
    config.providers = vec![
        format!("  - {{ name: hints, base_url: \"http://127.0.0.1:{hints}/v1\" }}"),
        format!("  - {{ name: gzip, base_url: \"http://127.0.0.1:{compressed}/v1\" }}"),
        format!("  - {{ name: mock, base_url: \"{}\" }}", mock.base_url()),
    ];
    config.models = "
  - name: hinted
    targets: [{ provider: hints }]
  - name: zipped
    strategy: priority
    targets: [{ provider: gzip }, { provider: mock }]
"
    .into();
    config.tenants = format!("\n  - id: acme\n    keys: [\"{TENANT_KEY}\"]\n");
    let gw = Gateway::start(&config);
    let resp = gw.post_json(CHAT, TENANT_KEY, &chat("hinted", false));
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    assert_eq!(resp.json()["choices"][0]["message"]["content"], "hi");
    let resp = gw.post_json(CHAT, TENANT_KEY, &chat("zipped", false));
    assert_eq!(
        resp.status, 200,
        "failed over past the answer that does not decode"
    );
    assert_eq!(resp.header("x-runestone-provider"), Some("mock"));
    assert_eq!(
        compressed_served.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "a whole answer that does not decode is not asked for again there"
    );
    assert!(!resp.body.starts_with(b"\x1f\x8b"));
    assert!(!gw.log().contains("panicked"), "{}", gw.log());
}

/// Codings read from every line of the answer's head: a gzip answer whose
/// `content-encoding` comes as `identity` and then `gzip` is decoded (it
/// used to be sent on still compressed, without the header, its key and
/// usage unread), and one with a transfer coding, or a coding the gateway
/// cannot name, is refused without the provider's words, key included,
/// reaching the log (whole or in halves over two lines).
#[test]
fn every_line_of_an_answers_codings_is_read() {
    const PROVIDER_KEY: &str = "sk-proj-Ab3dEf9HiJ2kLmN0pQ7z";
    let chat_body = format!(
        r#"{{"id":"c","object":"chat.completion","created":1,"model":"m","choices":[{{"index":0,"message":{{"role":"assistant","content":"your key {PROVIDER_KEY}"}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":3,"completion_tokens":7,"total_tokens":10}}}}"#
    );
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, chat_body.as_bytes()).unwrap();
    let gzipped = gz.finish().unwrap();
    let answer = |head: &str| {
        let mut out = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{head}Content-Length: {}\r\nConnection: close\r\n\r\n",
            gzipped.len()
        )
        .into_bytes();
        out.extend_from_slice(&gzipped);
        out
    };
    let (two_lines, _) = raw_provider(answer(
        "Content-Encoding: identity\r\nContent-Encoding: gzip\r\n",
    ));
    let (transfer, transfer_served) = raw_provider(answer("Transfer-Encoding: gzip\r\n"));
    let (named, named_served) =
        raw_provider(answer(&format!("Content-Encoding: {PROVIDER_KEY}\r\n")));
    // The key in halves, over two lines: no redaction finds it whole.
    let (halves, halves_served) = raw_provider(answer(&format!(
        "Content-Encoding: {}\r\nContent-Encoding: {}\r\n",
        &PROVIDER_KEY[..14],
        &PROVIDER_KEY[14..]
    )));
    let mock = Mock::start(&[]);
    let mut config = GatewayConfig::new(&mock);
    config.providers = [("lines", two_lines), ("transfer", transfer), ("named", named), ("halves", halves)]
        .iter()
        .map(|(name, port)| {
            format!("  - {{ name: {name}, base_url: \"http://127.0.0.1:{port}/v1\", api_key: \"{PROVIDER_KEY}\" }}")
        })
        .chain([format!("  - {{ name: mock, base_url: \"{}\" }}", mock.base_url())])
        .collect();
    config.models = "
  - name: lines
    targets: [{ provider: lines }]
  - name: transfer
    strategy: priority
    targets: [{ provider: transfer }, { provider: mock }]
  - name: named
    strategy: priority
    targets: [{ provider: named }, { provider: mock }]
  - name: halves
    strategy: priority
    targets: [{ provider: halves }, { provider: mock }]
"
    .into();
    config.tenants = format!("\n  - id: acme\n    keys: [\"{TENANT_KEY}\"]\n");
    let gw = Gateway::start(&config);

    let resp = gw.post_json(CHAT, TENANT_KEY, &chat("lines", false));
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    assert_eq!(resp.header("content-encoding"), None);
    let content = resp.json()["choices"][0]["message"]["content"].clone();
    assert_eq!(
        content,
        format!("your key {}", "*".repeat(PROVIDER_KEY.len()))
    );
    let billed = |kind: &str| {
        metric_sum(
            &gw.metrics(),
            "runestone_tokens_total",
            &[&format!("kind=\"{kind}\"")],
        )
    };
    assert_eq!(
        billed("completion"),
        7.0,
        "billed by the decoded answer's usage"
    );

    for (model, served) in [
        ("transfer", transfer_served),
        ("named", named_served),
        ("halves", halves_served),
    ] {
        let resp = gw.post_json(CHAT, TENANT_KEY, &chat(model, false));
        assert_eq!(
            resp.status,
            200,
            "{model}: {}",
            String::from_utf8_lossy(&resp.body)
        );
        assert_eq!(resp.header("x-runestone-provider"), Some("mock"), "{model}");
        assert!(
            served.load(std::sync::atomic::Ordering::SeqCst) >= 1,
            "{model}"
        );
        assert!(!resp.body.starts_with(b"\x1f\x8b"), "{model}");
    }
    let log = gw.log();
    assert!(log.contains("cannot decode"), "{log}");
    for part in PROVIDER_KEY.as_bytes().windows(8) {
        let part = std::str::from_utf8(part).unwrap();
        assert!(!log.contains(part), "{part} in {log}");
    }
}

#[test]
fn corrupt_or_forged_redis_entries_fail_alone_and_free_what_they_took() {
    let redis = Redis::start();
    let mock = Mock::start(&[]);
    let mut config = GatewayConfig::new(&mock);
    config.tenants = format!(
        "\n  - id: acme\n    keys: [\"{TENANT_KEY}\"]\n    limits: {{ max_concurrent: 2 }}\n    overflow: {{ enabled: true }}\n"
    );
    config.extra = redis.section();
    let gw = Gateway::start(&config);
    // Submitted now: a job older than jobs.max_age_seconds would expire
    // before anything else is looked at.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let job = |id: &str, json_id: &str, tokens: u64| {
        json!({"id": json_id, "tenant": "acme", "model": "gpt-4o-mini", "endpoint": "chat",
            "body": chat("gpt-4o-mini", false).to_string(), "headers": [], "tokens": tokens, "created_ms": now_ms})
        .to_string()
        .replace("\"__ID__\"", &format!("\"{id}\""))
    };
    // A job reserving absurd tokens, one whose stored id names another job,
    // and a parked request of an instance that no longer exists, far in the
    // future, at the head of the queue.
    for (id, stored) in [
        ("job_huge", job("job_huge", "job_huge", u64::MAX / 2)),
        ("job_liar", job("job_liar", "job_victim", 1)),
    ] {
        redis.cli(&[
            "HSET",
            &format!("runestone:{{acme}}:job:{id}"),
            "request",
            &stored,
            "state",
            "queued",
        ]);
        redis.cli(&["RPUSH", "runestone:{acme}:queue", &format!("a|{id}")]);
    }
    redis.cli(&[
        "LPUSH",
        "runestone:{acme}:queue",
        "s|ghost|1|99999999999999|deadinstance",
    ]);
    let after = submit(&gw, TENANT_KEY, "gpt-4o-mini");
    assert_eq!(
        result_of(&gw, TENANT_KEY, &after).status,
        200,
        "the queue is not blocked"
    );
    let huge = result_of(&gw, TENANT_KEY, "job_huge");
    assert_eq!(
        huge.status, 200,
        "huge reservations are clamped, not overflowed"
    );
    let liar = result_of(&gw, TENANT_KEY, "job_liar");
    assert_eq!(
        (liar.status, liar.error_code()),
        (500, "gateway_internal".to_string())
    );
    assert_eq!(
        gw.get("/v1/jobs/job_victim", Some(TENANT_KEY)).status,
        404,
        "nothing written elsewhere"
    );
    // Both slots are free.
    wait_until(Duration::from_secs(5), "the slots to be free", || {
        redis.cli(&["ZCARD", "runestone:{acme}:inflight"]).trim() == "0"
    });
    assert!(!gw.log().contains("panicked"), "{}", gw.log());
}

/// What a trickling provider saw: answers begun, and each connection's
/// time from its head to the gateway closing it.
#[derive(Default)]
struct Trickled {
    begun: std::sync::atomic::AtomicUsize,
    held: std::sync::Mutex<Vec<Duration>>,
}

/// A provider that answers `head` (a chunked answer) and then one byte
/// every 100 ms for up to 20 s, never ending.
fn trickling_provider(head: &'static str) -> (u16, std::sync::Arc<Trickled>) {
    staged_provider(vec![head.to_string()], Then::Trickle)
}

/// What a [`staged_provider`] does after its stages, for up to 20 s,
/// never ending the body.
#[derive(Clone, Copy)]
enum Then {
    /// Nothing: the body lingers.
    Linger,
    /// One byte every 100 ms.
    Trickle,
    /// SSE comments as fast as they are read, unframed: for a body that
    /// runs to the connection's close.
    Flood,
}

/// A provider that answers `stages` (a chunked answer's head and chunks),
/// 300 ms apart, then does what `then` says.
fn staged_provider(stages: Vec<String>, then: Then) -> (u16, std::sync::Arc<Trickled>) {
    let seen = std::sync::Arc::new(Trickled::default());
    let kept = seen.clone();
    let port = hand_written_provider(move |mut stream| {
        if !read_request(&mut stream) {
            return;
        }
        for (n, stage) in stages.iter().enumerate() {
            if n > 0 {
                std::thread::sleep(Duration::from_millis(300));
            }
            if stream.write_all(stage.as_bytes()).is_err() {
                return;
            }
        }
        kept.begun.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let started = Instant::now();
        let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
        let flood = format!(
            "data: {{\"choices\":[],\"x\":\"{}\"}}\n\n",
            "z".repeat(30_000)
        )
        .repeat(32);
        while started.elapsed() < Duration::from_secs(20) {
            let open = match then {
                Then::Trickle => stream.write_all(b"1\r\n \r\n").is_ok(),
                Then::Flood => stream.write_all(flood.as_bytes()).is_ok(),
                // Closed when a read ends (not when it times out).
                Then::Linger => !matches!(stream.read(&mut [0u8; 1]), Ok(0)),
            };
            if !open {
                break;
            }
            if !matches!(then, Then::Flood) {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        kept.held.lock().unwrap().push(started.elapsed());
    });
    (port, seen)
}

#[test]
fn an_answer_read_whole_is_bounded_by_the_first_token_deadline_and_the_client() {
    // An error answer and a translated (Anthropic) JSON answer are read
    // whole before anything reaches the client; a provider trickling one
    // byte at a time, well within idle_ms, must not hold the attempt (and
    // the tenant's slot) past first_token_ms, nor past the client.
    let (error, _) = trickling_provider(
        "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
    );
    let (json, json_seen) = trickling_provider(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
    );
    let mock = Mock::start(&[]);
    let mut config = GatewayConfig::new(&mock);
    config.providers = vec![
        format!("  - {{ name: drip, base_url: \"http://127.0.0.1:{error}/v1\", timeouts: {{ first_token_ms: 1000, idle_ms: 5000, total_ms: 60000 }} }}"),
        format!("  - {{ name: claude, kind: anthropic, base_url: \"http://127.0.0.1:{json}/v1\", api_key: \"sk-ant-x\", timeouts: {{ first_token_ms: 30000, idle_ms: 5000, total_ms: 60000 }} }}"),
    ];
    config.models = "
  - name: dripped
    targets: [{ provider: drip }]
  - name: claude
    targets: [{ provider: claude, model: claude-x }]
"
    .into();
    config.tenants = format!("\n  - id: acme\n    keys: [\"{TENANT_KEY}\"]\n");
    config.extra = "failover: { max_attempts: 1 }\n".into();
    let gw = Gateway::start(&config);
    let started = Instant::now();
    let resp = gw.post_json(CHAT, TENANT_KEY, &chat("dripped", false));
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "cut at first_token_ms, not at the trickle's end: {took:?}"
    );
    assert_eq!(resp.status, 504, "{}", String::from_utf8_lossy(&resp.body));
    assert_eq!(resp.error_code(), "upstream_timeout");

    // A client that goes away while the answer trickles: the provider's
    // connection is closed then, not when first_token_ms (30 s) runs out.
    let body = chat("claude", false).to_string();
    let mut client = std::net::TcpStream::connect(("127.0.0.1", config.port)).unwrap();
    write!(
        client,
        "POST {CHAT} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {TENANT_KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    wait_until(Duration::from_secs(10), "the answer to begin", || {
        json_seen.begun.load(std::sync::atomic::Ordering::SeqCst) == 1
    });
    drop(client);
    wait_until(
        Duration::from_secs(10),
        "the provider's connection to be closed",
        || !json_seen.held.lock().unwrap().is_empty(),
    );
    let held = json_seen.held.lock().unwrap()[0];
    assert!(
        held < Duration::from_secs(5),
        "closed when the client left: {held:?}"
    );
    assert!(!gw.log().contains("panicked"), "{}", gw.log());
}

#[test]
fn what_follows_a_streams_last_event_is_neither_sent_nor_billed() {
    // A whole stream, then after its `[DONE]` a usage event a million
    // times larger, a late content event, and a byte every 100 ms for 20 s:
    // the body never ends.
    let events = concat!(
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hi\"},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":3,\"total_tokens\":13}}\n\n",
        "data: [DONE]\n\n",
        "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":10000000,\"completion_tokens\":3000000,\"total_tokens\":13000000}}\n\n",
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"late\"}}]}\n\n",
    );
    let (port, seen) = staged_provider(vec![format!("{SSE_HEAD}{}", chunk(events))], Then::Trickle);
    let mock = Mock::start(&[]);
    let mut config = GatewayConfig::new(&mock);
    config.providers = vec![format!(
        "  - {{ name: drip, base_url: \"http://127.0.0.1:{port}/v1\", timeouts: {{ idle_ms: 1000, total_ms: 60000 }} }}"
    )];
    config.models = "\n  - name: dripped\n    targets: [{ provider: drip }]\n".into();
    config.tenants = format!(
        "\n  - id: acme\n    keys: [\"{TENANT_KEY}\"]\n    limits: {{ max_concurrent: 1 }}\n"
    );
    config.extra = "failover: { max_attempts: 1 }\n".into();
    let gw = Gateway::start(&config);

    // Read to its end: it ends about an idle timeout after `[DONE]`, with
    // nothing after it.
    let started = Instant::now();
    let (status, events) = sse_events(gw.port, CHAT, TENANT_KEY, &chat("dripped", true));
    let took = started.elapsed();
    assert_eq!(status, 200);
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    assert!(!events
        .iter()
        .any(|e| e.contains("late") || e.contains("error")));
    assert!(
        took < Duration::from_secs(10),
        "read past the idle timeout: {took:?}"
    );
    wait_until(
        Duration::from_secs(10),
        "the provider's connection to be closed",
        || !seen.held.lock().unwrap().is_empty(),
    );
    let held = seen.held.lock().unwrap()[0];
    assert!(held < Duration::from_secs(10), "held for {held:?}");
    let usage = gw.get("/v1/usage", Some(TENANT_KEY)).json();
    assert_eq!(
        (
            usage["prompt_tokens"].as_u64(),
            usage["completion_tokens"].as_u64()
        ),
        (Some(10), Some(3)),
        "billed as reported before [DONE]: {usage}"
    );

    // The request is settled when `[DONE]` goes by: with one concurrent
    // request allowed, a client that has its `[DONE]` (and is still
    // connected) can send its next request at once.
    let body = chat("dripped", true).to_string();
    let mut first = std::net::TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
    first
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        first,
        "POST {CHAT} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {TENANT_KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("data: [DONE]") {
        let n = first.read(&mut buf).expect("the stream until [DONE]");
        assert!(n > 0, "ended before [DONE]");
        got.extend_from_slice(&buf[..n]);
    }
    let status = read_sse(gw.port, TENANT_KEY, &chat("dripped", true), |_, _| {});
    assert_eq!(status, 200, "the slot was free once [DONE] went by");
    drop(first);
}

const SSE_HEAD: &str =
    "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";

/// `data` as one chunk of a chunked body.
fn chunk(data: &str) -> String {
    format!("{:x}\r\n{data}\r\n", data.len())
}

#[test]
fn a_done_freed_from_a_halted_stream_ends_the_answer() {
    // The finish, an event that is not JSON (the stream halts there while
    // it could still be resumed) and `[DONE]` come in one chunk after the
    // content; then the body lingers. `[DONE]` still settles and ends it.
    let first = "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hi\"},\"finish_reason\":null}]}\n\n";
    let last = concat!(
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":3,\"total_tokens\":13}}\n\n",
        "data: not json\n\n",
        "data: [DONE]\n\n",
    );
    let (port, _) = staged_provider(
        vec![format!("{SSE_HEAD}{}", chunk(first)), chunk(last)],
        Then::Linger,
    );
    let mock = Mock::start(&[]);
    let mut config = GatewayConfig::new(&mock);
    config.providers = vec![
        format!("  - {{ name: drip, base_url: \"http://127.0.0.1:{port}/v1\", timeouts: {{ idle_ms: 5000, total_ms: 60000 }} }}"),
        format!("  - {{ name: mock, base_url: \"{}\" }}", mock.base_url()),
    ];
    config.models = "\n  - name: dripped\n    strategy: priority\n    targets: [{ provider: drip }, { provider: mock }]\n".into();
    config.tenants = format!(
        "\n  - id: acme\n    keys: [\"{TENANT_KEY}\"]\n    limits: {{ max_concurrent: 1 }}\n"
    );
    config.extra = "circuit_breaker: { consecutive_failures: 1 }\n".into();
    let gw = Gateway::start(&config);
    let started = Instant::now();
    let (status, events) = sse_events(gw.port, CHAT, TENANT_KEY, &chat("dripped", true));
    assert_eq!(status, 200);
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    assert!(!events.iter().any(|e| e.contains("error")), "{events:?}");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "ended after the idle timeout: {took:?}"
    );
    let metrics = gw.metrics();
    assert!(!metrics.contains("provider_stream_broken"), "{metrics}");
    let state = metric_value(
        &metrics,
        &format!(r#"runestone_circuit_state{{backend="127.0.0.1:{port}",provider="drip"}}"#),
    );
    assert_eq!(state, 0.0, "a whole answer is not a failure");
}

#[test]
fn a_provider_flooding_after_done_is_read_for_a_second_and_no_longer() {
    // A whole answer without usage, then the body never ends: comments
    // as fast as they are read. The drain after `[DONE]` ends after its
    // second although a read never waits (it used to run to `total_ms`,
    // holding the tenant's only slot until then).
    let events = concat!(
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hello there\"},\"finish_reason\":\"stop\"}]}\n\n",
        "data: [DONE]\n\n",
    );
    let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n";
    let (port, seen) = staged_provider(vec![format!("{head}{events}")], Then::Flood);
    let mock = Mock::start(&[]);
    let mut config = GatewayConfig::new(&mock);
    config.providers = vec![format!(
        "  - {{ name: flood, base_url: \"http://127.0.0.1:{port}/v1\", timeouts: {{ idle_ms: 5000, total_ms: 60000 }} }}"
    )];
    config.models = "\n  - name: flooded\n    targets: [{ provider: flood }]\n".into();
    config.tenants = format!(
        "\n  - id: acme\n    keys: [\"{TENANT_KEY}\"]\n    limits: {{ max_concurrent: 1 }}\n"
    );
    let gw = Gateway::start(&config);
    let started = Instant::now();
    let (status, events) = sse_events(gw.port, CHAT, TENANT_KEY, &chat("flooded", true));
    let took = started.elapsed();
    assert_eq!(status, 200);
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    assert!(!events.iter().any(|e| e.contains("error")), "{events:?}");
    assert!(
        took < Duration::from_secs(4),
        "the body ended {took:?} after the request"
    );
    wait_until(
        Duration::from_secs(5),
        "the flood's connection closed",
        || !seen.held.lock().unwrap().is_empty(),
    );
    let held = seen.held.lock().unwrap()[0];
    assert!(held < Duration::from_secs(4), "the flood was read {held:?}");
    // Billed by the gateway's count (no usage came), and the slot is free.
    let usage = gw.get("/v1/usage", Some(TENANT_KEY)).json();
    assert!(
        usage["completion_tokens"].as_u64().is_some_and(|n| n > 0),
        "{usage}"
    );
    let answer = gw.post_json(CHAT, TENANT_KEY, &chat("flooded", true));
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let metrics = gw.metrics();
    assert!(!metrics.contains("provider_stream_broken"), "{metrics}");
}

#[test]
fn a_usage_report_after_done_is_billed_and_an_error_event_is_not_repeated() {
    // A sloppy server: its usage after `[DONE]`, then the body lingers.
    let openai = concat!(
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hi\"},\"finish_reason\":\"stop\"}]}\n\n",
        "data: [DONE]\n\n",
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":1000,\"completion_tokens\":777,\"total_tokens\":1777}}\n\n",
    );
    let (sloppy, _) = staged_provider(vec![format!("{SSE_HEAD}{}", chunk(openai))], Then::Linger);
    // An Anthropic stream that reports its own error, then stalls.
    let anthropic = concat!(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"usage\":{\"input_tokens\":5,\"output_tokens\":1}}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n",
        "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n",
    );
    let (failing, _) = staged_provider(
        vec![format!("{SSE_HEAD}{}", chunk(anthropic))],
        Then::Linger,
    );
    let mock = Mock::start(&[]);
    let mut config = GatewayConfig::new(&mock);
    config.providers = vec![
        format!("  - {{ name: sloppy, base_url: \"http://127.0.0.1:{sloppy}/v1\", timeouts: {{ idle_ms: 3000 }} }}"),
        format!("  - {{ name: claude, kind: anthropic, base_url: \"http://127.0.0.1:{failing}/v1\", api_key: \"sk-ant-x\", timeouts: {{ idle_ms: 1000 }} }}"),
    ];
    config.models = "
  - name: sloppy
    targets: [{ provider: sloppy }]
  - name: claude
    resume_streams: false
    targets: [{ provider: claude, model: claude-x }]
"
    .into();
    config.tenants = format!("\n  - id: acme\n    keys: [\"{TENANT_KEY}\"]\n");
    let gw = Gateway::start(&config);

    let (_, events) = sse_events(gw.port, CHAT, TENANT_KEY, &chat("sloppy", true));
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let usage = gw.get("/v1/usage", Some(TENANT_KEY)).json();
    assert_eq!(
        (
            usage["prompt_tokens"].as_u64(),
            usage["completion_tokens"].as_u64()
        ),
        (Some(1000), Some(777)),
        "the provider's report, not an estimate: {usage}"
    );

    let (_, events) = sse_events(gw.port, CHAT, TENANT_KEY, &chat("claude", true));
    let errors: Vec<_> = events.iter().filter(|e| e.contains("\"error\"")).collect();
    assert_eq!(errors.len(), 1, "{events:?}");
    assert!(errors[0].contains("Overloaded"), "{events:?}");
}

#[test]
fn streamed_speech_transcriptions_and_images_reach_the_client_as_they_come() {
    // The head is held until the first content: for these typed streams
    // that is their first delta, not the last event (which alone carries
    // the usage). The provider sends one delta and waits until the client
    // has it, so a gateway holding it would run out of first_token_ms.
    let streams = [
        (
            "/v1/audio/transcriptions",
            json!({"type": "transcript.text.delta", "delta": "Hel"}),
            json!({"type": "transcript.text.done", "text": "Hel", "usage": {"type": "tokens", "input_tokens": 20, "output_tokens": 2, "total_tokens": 22}}),
        ),
        (
            "/v1/audio/speech",
            json!({"type": "speech.audio.delta", "audio": "SUQz"}),
            json!({"type": "speech.audio.done", "usage": {"input_tokens": 3, "output_tokens": 10, "total_tokens": 13}}),
        ),
        (
            "/v1/images/generations",
            json!({"type": "image_generation.partial_image", "b64_json": "iVBO", "partial_image_index": 0}),
            json!({"type": "image_generation.completed", "b64_json": "iVBO", "usage": {"input_tokens": 5, "output_tokens": 50, "total_tokens": 55}}),
        ),
    ];
    let client_has_it = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let provider_waits = client_has_it.clone();
    // Or ends the body without its last event.
    let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let provider_cuts = cut.clone();
    let port = hand_written_provider(move |mut stream| {
        let Some(request) = request_bytes(&mut stream) else {
            return;
        };
        let request = String::from_utf8_lossy(&request);
        let Some((_, first, last)) = streams.iter().find(|(path, ..)| request.contains(path))
        else {
            return;
        };
        let chunk = |event: &Value| {
            let event = format!("data: {event}\n\n");
            format!("{:x}\r\n{event}\r\n", event.len())
        };
        let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
        let _ = stream.write_all(format!("{head}{}", chunk(first)).as_bytes());
        wait_until(
            Duration::from_secs(10),
            "the client to have the delta",
            || provider_waits.load(std::sync::atomic::Ordering::SeqCst),
        );
        let last = match provider_cuts.load(std::sync::atomic::Ordering::SeqCst) {
            true => String::new(),
            false => chunk(last),
        };
        let _ = stream.write_all(format!("{last}0\r\n\r\n").as_bytes());
    });
    let mock = Mock::start(&[]);
    let gw = Gateway::start(&alone(
        &mock,
        "typed",
        port,
        ", timeouts: { first_token_ms: 1000 }",
    ));
    let form = "--b\r\ncontent-disposition: form-data; name=\"model\"\r\n\r\nm\r\n--b\r\ncontent-disposition: form-data; name=\"stream\"\r\n\r\ntrue\r\n--b\r\ncontent-disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\ncontent-type: audio/wav\r\n\r\nRIFF\r\n--b--\r\n";
    let speech =
        json!({"model": "m", "input": "hi", "voice": "alloy", "stream_format": "sse"}).to_string();
    let image =
        json!({"model": "m", "prompt": "a cat", "stream": true, "partial_images": 1}).to_string();
    let requests = [
        (
            "/v1/audio/transcriptions",
            "multipart/form-data; boundary=b",
            form.as_bytes(),
        ),
        ("/v1/audio/speech", "application/json", speech.as_bytes()),
        (
            "/v1/images/generations",
            "application/json",
            image.as_bytes(),
        ),
    ];
    for cut_short in [false, true] {
        cut.store(cut_short, std::sync::atomic::Ordering::SeqCst);
        for (path, content_type, body) in requests {
            client_has_it.store(false, std::sync::atomic::Ordering::SeqCst);
            let mut events = Vec::new();
            let status = read_sse_of(gw.port, path, TENANT_KEY, content_type, body, |data, _| {
                events.push(serde_json::from_str::<Value>(data).unwrap());
                client_has_it.store(true, std::sync::atomic::Ordering::SeqCst);
            });
            assert_eq!(status, 200, "{path}: {events:?}");
            assert_eq!(events.len(), 2, "{path}: {events:?}");
            let last = &events[1];
            if cut_short {
                // The stream is not whole: its client is told (the SDKs
                // raise at an event with an `error`).
                assert_eq!(
                    last["error"]["code"], "upstream_error",
                    "{path}: {events:?}"
                );
            } else {
                let kind = last["type"].as_str().unwrap();
                assert!(
                    kind.ends_with("done") || kind.ends_with("completed"),
                    "{path}: {events:?}"
                );
            }
        }
    }
}

#[test]
fn streamed_speech_its_client_leaves_is_billed_the_usage_its_last_event_reports() {
    // Speech priced by tokens reports them only in its last event: a client
    // that takes the audio and leaves before it does not make it free.
    let client_left = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let provider_waits = client_left.clone();
    let port = hand_written_provider(move |mut stream| {
        if request_bytes(&mut stream).is_none() {
            return;
        }
        let chunk = |event: Value| {
            let event = format!("data: {event}\n\n");
            format!("{:x}\r\n{event}\r\n", event.len())
        };
        let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
        let delta = chunk(json!({"type": "speech.audio.delta", "audio": "SUQz"}));
        let _ = stream.write_all(format!("{head}{delta}").as_bytes());
        wait_until(Duration::from_secs(10), "the client to leave", || {
            provider_waits.load(std::sync::atomic::Ordering::SeqCst)
        });
        let done = chunk(
            json!({"type": "speech.audio.done", "usage": {"input_tokens": 3, "output_tokens": 700, "total_tokens": 703}}),
        );
        let _ = stream.write_all(format!("{done}0\r\n\r\n").as_bytes());
    });
    let mock = Mock::start(&[]);
    let gw = Gateway::start(&alone(&mock, "tts", port, ""));
    let body = json!({"model": "m", "input": "hi", "voice": "alloy", "stream_format": "sse"});
    let resp = ureq::post(&gw.url("/v1/audio/speech"))
        .set("authorization", &format!("Bearer {TENANT_KEY}"))
        .send_json(body)
        .unwrap();
    let mut reader = std::io::BufReader::new(resp.into_reader());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
    assert!(line.contains("speech.audio.delta"), "{line}");
    drop(reader);
    client_left.store(true, std::sync::atomic::Ordering::SeqCst);
    let completion = || {
        metric_sum(
            &gw.metrics(),
            "runestone_tokens_total",
            &["kind=\"completion\""],
        )
    };
    wait_until(Duration::from_secs(10), "the request to be billed", || {
        completion() > 0.0
    });
    assert_eq!(completion(), 700.0, "billed what its last event reported");
}
