//! Unit tests of loading and validation.

use super::*;
use std::time::Duration;

const VALID: &str = r#"
server:
  listen: "127.0.0.1:8080"
  metrics_listen: "127.0.0.1:9464"
providers:
  - name: openai
    base_url: "https://api.openai.com/v1"
    api_key: "${OPENAI_API_KEY}"
  - name: local
    base_url: "http://127.0.0.1:9000/v1/"
models:
  - name: gpt-4o-mini
    targets:
      - { provider: openai }
      - { provider: local, model: mock-small }
tenants:
  - id: acme
    keys: ["sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", "dev-key-acme"]
    models: ["gpt-4o-mini"]
"#;

fn env(name: &str) -> Option<String> {
    (name == "OPENAI_API_KEY").then(|| "sk-provider".to_string())
}

fn problems(yaml: &str) -> Vec<String> {
    Config::from_yaml(yaml, env)
        .expect_err("expected problems")
        .into_iter()
        .map(|p| p.to_string())
        .collect()
}

#[test]
fn loads_a_valid_config_with_defaults() {
    let config = Config::from_yaml(VALID, env).unwrap();
    assert_eq!(config.server.threads, 2);
    assert_eq!(
        config.server.max_request_body_bytes,
        DEFAULT_MAX_REQUEST_BODY_BYTES
    );
    assert_eq!(
        config.providers[0].api_key.as_ref().unwrap().expose(),
        "sk-provider"
    );
    assert_eq!(format!("{:?}", config.providers[0].api_key), "Some(*****)");
    assert_eq!(config.providers[1].base_url.path, "/v1");
    assert_eq!(config.providers[1].base_url.authority, "127.0.0.1:9000");
    let (_, route) = config.route("gpt-4o-mini").unwrap();
    assert_eq!(
        route.targets[0],
        Target {
            provider: 0,
            model: "gpt-4o-mini".into(),
            price: None,
        }
    );
    assert_eq!(
        route.targets[1],
        Target {
            provider: 1,
            model: "mock-small".into(),
            price: None,
        }
    );
    let keys = crate::auth::KeyIndex::new(&config.tenants);
    assert_eq!(keys.authenticate("test"), Some(0), "sha256 of 'test'");
    assert_eq!(keys.authenticate("dev-key-acme"), Some(0));
    assert!(config.tenants[0].may_use("gpt-4o-mini"));
    assert!(!config.tenants[0].may_use("gpt-4o"));
}

#[test]
fn reports_every_problem_with_its_key_path() {
    let yaml = r#"
server:
  listen: "nowhere"
  colour: blue
providers:
  - name: openai
    base_url: "ftp://example.com"
    api_key: "${MISSING_KEY}"
  - name: other
    base_url: "not a url"
    surprise: 1
models:
  - name: m
    targets: [{ provider: ghost }]
tenants:
  - id: acme
    keys: ["sha256:abc"]
    models: ["nope"]
  - id: acme
    keys: ["short"]
extra: true
"#;
    let found = problems(yaml);
    let expect = [
        "extra: unknown key",
        "server.colour: unknown field `colour`",
        "providers[0].api_key: environment variable MISSING_KEY is not set",
        "providers[0].base_url: scheme 'ftp'",
        "providers[1].surprise: unknown field `surprise`",
        "models[0].targets[0].provider: unknown provider 'ghost'",
        "tenants[0].keys[0]: a 'sha256:' key must be followed by 64 hex digits",
        "tenants[0].models[0]: unknown model 'nope'",
        "tenants[1].id: duplicate tenant id 'acme'",
        "tenants[1].keys[0]: a plaintext key must be at least 8 characters",
    ];
    for e in expect {
        assert!(
            found.iter().any(|f| f.starts_with(e)),
            "missing {e:?} in {found:#?}"
        );
    }
}

#[test]
fn loads_limits_pricing_and_redis() {
    let yaml = VALID.replace(
            "    models: [\"gpt-4o-mini\"]\n",
            "    models: [\"gpt-4o-mini\"]\n    limits: { requests_per_minute: 60, tokens_per_minute: 1000, max_concurrent: 2, budget_usd: { amount: 1.5, period: daily } }\n",
        ) + "pricing:\n  gpt-4o-mini: { input: 0.15, output: 0.6, cached_input: 0.075 }\nredis: { url: \"redis://127.0.0.1:6379/0\" }\n";
    let config = Config::from_yaml(&yaml, env).unwrap();
    let limits = &config.tenants[0].limits;
    assert_eq!(limits.requests_per_minute, Some(60));
    assert_eq!(limits.tokens_per_minute, Some(1000));
    assert_eq!(limits.max_concurrent, Some(2));
    assert_eq!(
        limits.budget,
        Some(Budget {
            amount_pusd: 1_500_000_000_000,
            period: BudgetPeriod::Daily
        })
    );
    assert_eq!(
        config.pricing["gpt-4o-mini"],
        Price {
            input: 150_000,
            output: 600_000,
            cached_input: 75_000,
            ..Price::default()
        }
    );
    let redis = config.redis.clone().unwrap();
    assert_eq!(
        (redis.key_prefix.as_str(), redis.timeout.as_millis()),
        ("runestone", 50)
    );
    assert_eq!(redis.lease, None, "every admission in Redis unless asked");
    assert!(config.warnings().is_empty());

    let leased = yaml.replace(
        "redis: { url: \"redis://127.0.0.1:6379/0\" }",
        "redis: { url: \"redis://127.0.0.1:6379/0\", lease: { share: 0.05 } }",
    );
    let lease = Config::from_yaml(&leased, env)
        .unwrap()
        .redis
        .unwrap()
        .lease;
    assert_eq!(
        lease,
        Some(LeaseSettings {
            share: 0.05,
            hold: std::time::Duration::from_millis(1000)
        })
    );
}

#[test]
fn reports_bad_redis_leases() {
    let with = |lease: &str| {
        VALID.to_string()
            + &format!("redis: {{ url: \"redis://127.0.0.1:6379/0\", lease: {lease} }}\n")
    };
    for (lease, e) in [
        (
            "{ share: 0 }",
            "redis.lease.share: must be more than 0 and at most 0.5",
        ),
        (
            "{ share: 0.6 }",
            "redis.lease.share: must be more than 0 and at most 0.5",
        ),
        (
            "{ share: .nan }",
            "redis.lease.share: must be more than 0 and at most 0.5",
        ),
        (
            "{ share: 0.1, ms: 50 }",
            "redis.lease.ms: must be between 100 and 10000",
        ),
        (
            "{ share: 0.1, ms: 20000 }",
            "redis.lease.ms: must be between 100 and 10000",
        ),
        ("{ ms: 500 }", "redis.lease: missing field `share`"),
        (
            "{ share: 0.1, hold: 5 }",
            "redis.lease.hold: unknown field `hold`",
        ),
    ] {
        let found = problems(&with(lease));
        assert!(
            found.iter().any(|f| f.starts_with(e)),
            "{lease}: missing {e:?} in {found:#?}"
        );
    }
}

#[test]
fn reports_bad_limits_pricing_and_redis() {
    let yaml = VALID.replace(
            "    models: [\"gpt-4o-mini\"]\n",
            "    limits: { requests_per_minute: 0, budget_usd: { amount: -1, period: weekly }, burst: 3 }\n",
        ) + "pricing:\n  gpt-5: { input: 1, output: 2 }\n  gpt-4o-mini: { input: -1, output: 2 }\nredis: { url: \"http://x\", timeout_ms: 0 }\n";
    let found = problems(&yaml);
    for e in [
        "tenants[0].limits.burst: unknown field `burst`",
        "pricing.gpt-5: unknown model 'gpt-5'",
        "pricing.gpt-4o-mini.input: must be a non-negative price",
        "redis.url: must be a redis://",
        "redis.timeout_ms: must be between 1 and 10000",
    ] {
        assert!(
            found.iter().any(|f| f.starts_with(e)),
            "missing {e:?} in {found:#?}"
        );
    }
    let yaml = VALID.replace(
        "    models: [\"gpt-4o-mini\"]\n",
        "    limits: { requests_per_minute: 0, budget_usd: { amount: -1, period: weekly } }\n",
    );
    let found = problems(&yaml);
    for e in [
        "tenants[0].limits.requests_per_minute: must be at least 1",
        "tenants[0].limits.budget_usd.period: unknown period 'weekly'",
        "tenants[0].limits.budget_usd.amount: must be a positive number",
    ] {
        assert!(
            found.iter().any(|f| f.starts_with(e)),
            "missing {e:?} in {found:#?}"
        );
    }
}

#[test]
fn warns_about_provider_keys_too_short_to_mask() {
    let yaml = VALID.replacen("api_key:", "api_key: \"EMPTY\" #", 1);
    assert_ne!(yaml, VALID);
    let config = Config::from_yaml(&yaml, env).unwrap();
    let warnings = config.warnings();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("api_key of 5 characters")),
        "{warnings:#?}"
    );
    let word = VALID.replacen("api_key:", "api_key: \"assistant\" #", 1);
    let warnings = Config::from_yaml(&word, env).unwrap().warnings();
    assert!(
        warnings.iter().any(|w| w.contains("letters only")),
        "{warnings:#?}"
    );
}

#[test]
fn warns_about_models_without_a_price() {
    let config = Config::from_yaml(VALID, env).unwrap();
    assert_eq!(config.warnings().len(), 1);
    assert!(config.warnings()[0].contains("'gpt-4o-mini' has no price"));
}

#[test]
fn reports_bad_listen_address_once_server_parses() {
    let yaml = VALID.replace("127.0.0.1:8080", "localhost");
    assert_eq!(
        problems(&yaml),
        ["server.listen: 'localhost' is not an IP:port address"]
    );
}

#[test]
fn bounds_the_request_head_limit() {
    let config = Config::from_yaml(VALID, env).unwrap();
    assert_eq!(
        config.server.max_request_header_bytes,
        DEFAULT_MAX_REQUEST_HEADER_BYTES
    );
    for bad in ["100", "2000000"] {
        let yaml = VALID.replace(
            "  metrics_listen: \"127.0.0.1:9464\"\n",
            &format!("  metrics_listen: \"127.0.0.1:9464\"\n  max_request_header_bytes: {bad}\n"),
        );
        assert_eq!(
                problems(&yaml),
                ["server.max_request_header_bytes: must be between 1024 and 1048576 (Pingora reads at most 1 MiB of headers)"]
            );
    }
}

#[test]
fn bounds_the_client_idle_timeout() {
    let config = Config::from_yaml(VALID, env).unwrap();
    assert_eq!(
        config.server.client_idle_timeout,
        Duration::from_secs(DEFAULT_CLIENT_IDLE_TIMEOUT_SECONDS)
    );
    let with = |value: &str| {
        VALID.replace(
            "  metrics_listen: \"127.0.0.1:9464\"\n",
            &format!(
                "  metrics_listen: \"127.0.0.1:9464\"\n  client_idle_timeout_seconds: {value}\n"
            ),
        )
    };
    let config = Config::from_yaml(&with("5"), env).unwrap();
    assert_eq!(config.server.client_idle_timeout, Duration::from_secs(5));
    for bad in ["0", "3601"] {
        assert_eq!(
            problems(&with(bad)),
            ["server.client_idle_timeout_seconds: must be between 1 and 3600"]
        );
    }
}

#[test]
fn bounds_the_client_send_timeout() {
    let config = Config::from_yaml(VALID, env).unwrap();
    assert_eq!(
        config.server.client_send_timeout,
        Duration::from_secs(DEFAULT_CLIENT_SEND_TIMEOUT_SECONDS)
    );
    let with = |value: &str| {
        VALID.replace(
            "  metrics_listen: \"127.0.0.1:9464\"\n",
            &format!(
                "  metrics_listen: \"127.0.0.1:9464\"\n  client_send_timeout_seconds: {value}\n"
            ),
        )
    };
    let config = Config::from_yaml(&with("5"), env).unwrap();
    assert_eq!(config.server.client_send_timeout, Duration::from_secs(5));
    for bad in ["0", "3601"] {
        assert_eq!(
            problems(&with(bad)),
            ["server.client_send_timeout_seconds: must be between 1 and 3600"]
        );
    }
    assert!(
        problems(&with("-1"))[0].starts_with("server"),
        "{:?}",
        problems(&with("-1"))
    );
}

#[test]
fn rejects_a_key_shared_by_two_tenants() {
    let yaml = format!("{VALID}  - id: beta\n    keys: [\"dev-key-acme\"]\n");
    assert_eq!(
        problems(&yaml),
        ["tenants[1].keys[0]: the same key is already configured for tenant 'acme'"]
    );
}

#[test]
fn parses_base_urls() {
    let url = BaseUrl::parse("https://api.openai.com/v1").unwrap();
    assert_eq!(
        (url.tls, url.port, url.path.as_str(), url.authority.as_str()),
        (true, 443, "/v1", "api.openai.com")
    );
    let url = BaseUrl::parse("http://[::1]:8000/").unwrap();
    assert_eq!(
        (
            url.host.as_str(),
            url.port,
            url.path.as_str(),
            url.authority.as_str()
        ),
        ("::1", 8000, "", "[::1]:8000")
    );
    assert!(BaseUrl::parse("https://user:pw@x.com/v1").is_err());
    assert!(BaseUrl::parse("https://x.com/v1?a=b").is_err());
    assert!(BaseUrl::parse("http://x.com:0/v1")
        .unwrap_err()
        .contains("port 0"));
    // Slashes the URL standard would read past to find a host.
    for typo in [
        "http:///v1",
        "http:////x.com/v1",
        "http:/x.com/v1",
        "http:x.com/v1",
        "https:\\\\x.com/v1",
        "http:/\\x.com",
    ] {
        assert!(
            BaseUrl::parse(typo).unwrap_err().contains("no host"),
            "{typo}"
        );
    }
    assert_eq!(BaseUrl::parse(" HTTP://x.com/v1 ").unwrap().host, "x.com");
}

#[test]
fn rejects_yaml_that_is_not_a_mapping() {
    assert_eq!(problems("- 1"), ["the file must be a YAML mapping"]);
    assert!(problems("server: [")
        .iter()
        .all(|p| p.starts_with("not valid YAML")));
}

#[test]
fn refuses_a_provider_key_that_cannot_be_a_header() {
    let yaml = VALID.replace("\"${OPENAI_API_KEY}\"", "\"sk-abc\\n\"");
    let problems = Config::from_yaml(&yaml, |_| Some("x".into())).unwrap_err();
    assert!(
        problems.iter().any(|p| p.path == "providers[0].api_key"),
        "{problems:?}"
    );
}

#[test]
fn failover_knobs_have_their_documented_defaults() {
    let config = Config::from_yaml(VALID, env).unwrap();
    let f = config.failover;
    assert_eq!(
        (
            f.max_attempts,
            f.max_retry_wait,
            f.same_deployment_retries,
            f.same_deployment_delay
        ),
        (3, Duration::from_secs(2), 1, Duration::from_millis(100))
    );
    assert_eq!(
        (config.breaker.open, config.breaker.max_open),
        (Duration::from_secs(10), Duration::from_secs(30))
    );
    let p = &config.providers[0];
    assert_eq!(p.timeouts.first_token, Duration::from_secs(60));
    assert!(
        !p.supports_prefill,
        "an OpenAI-compatible server is not assumed to continue"
    );
    let (_, route) = config.route("gpt-4o-mini").unwrap();
    assert!(route.resume_streams && route.context_fallbacks.is_empty());
    let anthropic = VALID.replace(
        "  - name: local\n",
        "  - { name: claude, kind: anthropic, base_url: \"https://api.anthropic.com\" }\n  - name: local\n",
    );
    let config = Config::from_yaml(&anthropic, env).unwrap();
    assert!(
        config.providers[1].supports_prefill,
        "Anthropic continues a prefill"
    );
    // A config written when open_seconds could exceed 30 stays valid.
    let longer = format!("{VALID}circuit_breaker: {{ open_seconds: 60 }}\n");
    let config = Config::from_yaml(&longer, env).unwrap();
    assert_eq!(config.breaker.max_open, Duration::from_secs(60));
}

#[test]
fn reports_bad_failover_settings() {
    let yaml = format!(
        "{}failover: {{ max_attempts: 0, max_retry_wait_ms: 70000, same_deployment_retries: 4, same_deployment_delay_ms: 20000 }}\n",
        VALID.replace(
            "      - { provider: local, model: mock-small }\n",
            "      - { provider: local, model: mock-small }\n    context_fallbacks: [gpt-5-huge]\n",
        )
    );
    let problems = problems(&yaml);
    for key in [
        "failover.max_attempts",
        "failover.max_retry_wait_ms",
        "failover.same_deployment_retries",
        "failover.same_deployment_delay_ms",
        "context_fallbacks",
    ] {
        assert!(
            problems.iter().any(|p| p.contains(key)),
            "{key}: {problems:?}"
        );
    }
}

#[test]
fn prices_media_per_request_image_second_and_character() {
    let yaml = VALID.to_string()
        + "pricing:\n  gpt-4o-mini: { per_image: 0.04, per_request: 0.001, per_audio_second: 0.0001, per_1m_characters: 15 }\n  openai/gpt-4o-mini: { input: 5, output: 40, per_request: 0.002 }\n";
    let config = Config::from_yaml(&yaml, env).unwrap();
    assert_eq!(
        config.pricing["gpt-4o-mini"],
        Price {
            image: 40_000_000_000,
            request: 1_000_000_000,
            audio_second: 100_000_000,
            character: 15_000_000,
            ..Price::default()
        }
    );
    assert_eq!(config.pricing["openai/gpt-4o-mini"].request, 2_000_000_000);
    for (price, problem) in [
        ("{}", "pricing.gpt-4o-mini: give input and output"),
        (
            "{ input: 1 }",
            "pricing.gpt-4o-mini.output: input and output are priced together",
        ),
        (
            "{ per_image: -1 }",
            "pricing.gpt-4o-mini.per_image: must be a non-negative price in USD",
        ),
        (
            "{ per_request: 5000 }",
            "pricing.gpt-4o-mini.per_request: must be a non-negative price in USD",
        ),
        (
            "{ per_minute: 1 }",
            "pricing.gpt-4o-mini.per_minute: unknown field",
        ),
    ] {
        let yaml = VALID.to_string() + &format!("pricing:\n  gpt-4o-mini: {price}\n");
        let found = problems(&yaml);
        assert!(
            found.iter().any(|f| f.starts_with(problem)),
            "missing {problem:?} in {found:#?}"
        );
    }
}

#[test]
fn loads_job_settings_and_tenant_weights() {
    let config = Config::from_yaml(VALID, env).unwrap();
    assert_eq!(config.jobs, JobSettings::default());
    assert_eq!(config.tenants[0].overflow.weight, 1);
    let yaml = VALID.replace(
        "    models: [\"gpt-4o-mini\"]\n",
        "    models: [\"gpt-4o-mini\"]\n    overflow: { enabled: true, weight: 3 }\n",
    ) + "jobs: { result_ttl_seconds: 600, idempotency_window_seconds: 60, max_attempts: 3, max_age_seconds: 900, timeout_seconds: 30, retry_backoff_ms: 200, retry_backoff_max_ms: 2000, concurrency: 4 }\n";
    let config = Config::from_yaml(&yaml, env).unwrap();
    assert_eq!(config.tenants[0].overflow.weight, 3);
    let jobs = config.jobs;
    assert_eq!(
        (
            jobs.idempotency_window,
            jobs.max_attempts,
            jobs.max_age,
            jobs.timeout
        ),
        (
            Duration::from_secs(60),
            3,
            Duration::from_secs(900),
            Duration::from_secs(30)
        )
    );
    assert_eq!(
        (jobs.retry_backoff, jobs.retry_backoff_max, jobs.concurrency),
        (Duration::from_millis(200), Duration::from_secs(2), 4)
    );
}

#[test]
fn reports_bad_job_settings() {
    let yaml = VALID.replace(
        "    models: [\"gpt-4o-mini\"]\n",
        "    models: [\"gpt-4o-mini\"]\n    overflow: { weight: 0 }\n",
    ) + "jobs: { result_ttl_seconds: 600, idempotency_window_seconds: 601, max_attempts: 0, max_age_seconds: 4201, timeout_seconds: 0, retry_backoff_ms: 5000, retry_backoff_max_ms: 1000, concurrency: 0 }\n";
    let found = problems(&yaml);
    for key in [
        "tenants[0].overflow.weight",
        "jobs.idempotency_window_seconds",
        "jobs.max_attempts",
        "jobs.max_age_seconds",
        "jobs.timeout_seconds",
        "jobs.retry_backoff_max_ms",
        "jobs.concurrency",
    ] {
        assert!(
            found.iter().any(|p| p.starts_with(key)),
            "{key} in {found:?}"
        );
    }
}

#[test]
fn loads_telemetry_with_its_defaults_and_secret_headers() {
    assert!(Config::from_yaml(VALID, env).unwrap().telemetry.is_none());
    let yaml = VALID.to_string()
        + "telemetry: { otlp_endpoint: \"http://otel-collector:4318\", headers: { Authorization: \"Bearer ${OTLP_TOKEN}\" } }\n";
    let config = Config::from_yaml(&yaml, |name| {
        (name == "OTLP_TOKEN")
            .then(|| "tok-1".to_string())
            .or_else(|| env(name))
    })
    .unwrap();
    let telemetry = config.telemetry.unwrap();
    assert_eq!(telemetry.traces_url.authority, "otel-collector:4318");
    assert_eq!(telemetry.traces_url.path, "/v1/traces");
    assert_eq!(telemetry.service_name, "runestone");
    assert_eq!(telemetry.sample_ratio, 1.0);
    assert!(!telemetry.capture_content);
    assert_eq!(telemetry.headers[0].0.as_str(), "authorization");
    assert_eq!(telemetry.headers[0].1.expose(), "Bearer tok-1");
    assert!(
        !format!("{telemetry:?}").contains("tok-1"),
        "header values are never printed"
    );
    assert!(!config
        .literal_secrets
        .iter()
        .any(|s| s.starts_with("telemetry")));

    let named = VALID.to_string()
        + "telemetry: { otlp_endpoint: \"https://collector.example/otlp/v1/traces\", service_name: gw, sample_ratio: 0.25, capture_content: true, headers: { x-token: literal } }\n";
    let config = Config::from_yaml(&named, env).unwrap();
    let telemetry = config.telemetry.as_ref().unwrap();
    assert!(telemetry.traces_url.tls);
    assert_eq!(telemetry.traces_url.path, "/otlp/v1/traces");
    assert_eq!(
        (telemetry.sample_ratio, telemetry.capture_content),
        (0.25, true)
    );
    assert!(config
        .literal_secrets
        .contains(&"telemetry.headers.x-token".to_string()));
}

#[test]
fn reports_bad_telemetry_settings() {
    let yaml = VALID.to_string()
        + "telemetry: { otlp_endpoint: \"grpc://collector:4317/?api_key=secret-q\", service_name: \" \", sample_ratio: 1.5, headers: { \"bad name\": x, host: y, x-ok: \"secret\\nvalue\", content-encoding: gzip, Authorization: a, authorization: b } }\n";
    let found = problems(&yaml);
    for key in [
        "telemetry.otlp_endpoint",
        "telemetry.service_name",
        "telemetry.sample_ratio",
        "telemetry.headers.bad name",
        "telemetry.headers.host",
        "telemetry.headers.x-ok",
        "telemetry.headers.content-encoding",
        "telemetry.headers.authorization",
    ] {
        assert!(
            found.iter().any(|p| p.starts_with(key)),
            "{key} in {found:?}"
        );
    }
    assert!(!found.iter().any(|p| p.contains("secret")), "{found:?}");
    let unknown =
        VALID.to_string() + "telemetry: { otlp_endpoint: \"http://c:4318\", sampler: x }\n";
    assert!(problems(&unknown)
        .iter()
        .any(|p| p.starts_with("telemetry")));
    let missing = VALID.to_string() + "telemetry: { service_name: x }\n";
    assert!(problems(&missing)
        .iter()
        .any(|p| p.starts_with("telemetry")));
}

#[test]
fn loads_the_cache_with_model_and_tenant_overrides() {
    assert!(Config::from_yaml(VALID, env).unwrap().cache.is_none());
    let yaml = VALID
        .replace(
            "      - { provider: local, model: mock-small }\n",
            "      - { provider: local, model: mock-small }\n    cache: { ttl_seconds: 86400 }\n",
        )
        .replace(
            "    models: [\"gpt-4o-mini\"]\n",
            "    models: [\"gpt-4o-mini\"]\n    cache: false\n",
        )
        + "cache: { ttl_seconds: 60, max_entry_bytes: 4096, max_memory_bytes: 8192, only_deterministic: false }\n";
    let config = Config::from_yaml(&yaml, env).unwrap();
    let cache = config.cache.unwrap();
    assert_eq!(cache.ttl, Duration::from_secs(60));
    assert_eq!(
        (cache.max_entry_bytes, cache.max_memory_bytes),
        (4096, 8192)
    );
    assert!(!cache.only_deterministic);
    assert!(config
        .models
        .iter()
        .any(|m| m.cache == crate::config::ModelCache::Ttl(Duration::from_secs(86_400))));
    assert!(!config.tenants[0].cache);
    let defaults = Config::from_yaml(&(VALID.to_string() + "cache: {}\n"), env).unwrap();
    assert_eq!(
        defaults.cache,
        Some(crate::config::CacheSettings::default())
    );
    assert!(defaults.tenants[0].cache);
}

#[test]
fn reports_bad_cache_settings() {
    let yaml = VALID.replace(
        "      - { provider: local, model: mock-small }\n",
        "      - { provider: local, model: mock-small }\n    cache: { ttl_seconds: 0, keep: 1 }\n",
    )
        + "cache: { ttl_seconds: 0, max_entry_bytes: 10, max_memory_bytes: 5, colour: x }\n";
    let found = problems(&yaml);
    assert!(found.iter().any(|p| p.starts_with("cache")), "{found:?}");
    let yaml = VALID.replace(
        "      - { provider: local, model: mock-small }\n",
        "      - { provider: local, model: mock-small }\n    cache: { ttl_seconds: 0, keep: 1 }\n",
    ) + "cache: { ttl_seconds: 0, max_entry_bytes: 10, max_memory_bytes: 5 }\n";
    let found = problems(&yaml);
    for key in [
        "cache.ttl_seconds",
        "cache.max_entry_bytes",
        "cache.max_memory_bytes",
        "models[0].cache.ttl_seconds",
        "models[0].cache",
    ] {
        assert!(
            found.iter().any(|p| p.starts_with(key)),
            "{key} in {found:?}"
        );
    }
    let without = VALID.replace(
        "      - { provider: local, model: mock-small }\n",
        "      - { provider: local, model: mock-small }\n    cache: { ttl_seconds: 60 }\n",
    );
    assert!(problems(&without)
        .iter()
        .any(|p| p.contains("needs a top-level cache")));
    let tenant = VALID.replace(
        "    models: [\"gpt-4o-mini\"]\n",
        "    models: [\"gpt-4o-mini\"]\n    cache: maybe\n",
    ) + "cache: {}\n";
    assert!(problems(&tenant)
        .iter()
        .any(|p| p.starts_with("tenants[0]")));
}

#[test]
fn refuses_provider_keys_a_header_cannot_carry_as_written() {
    for (key, expected) in [
        ("sk-provider-key\\n", "must be printable ASCII"),
        ("sk-provider-key ", "must not begin or end with a space"),
        ("  sk-provider-key", "must not begin or end with a space"),
    ] {
        let yaml = VALID.replacen(
            "api_key: \"${OPENAI_API_KEY}\"",
            &format!("api_key: \"{key}\""),
            1,
        );
        assert_ne!(yaml, VALID);
        let found = problems(&yaml);
        assert!(
            found
                .iter()
                .any(|p| p.starts_with("providers[0].api_key: ") && p.contains(expected)),
            "{key:?}: {found:#?}"
        );
    }
}

#[test]
fn prices_processing_tiers_apart_from_the_standard_one() {
    use crate::cost::ServiceTier;
    let yaml = VALID.to_string()
        + "pricing:\n  gpt-4o-mini:\n    input: 1.25\n    output: 10\n    cached_input: 0.125\n    service_tiers:\n      flex: { input: 0.625, output: 5 }\n      priority: { input: 2.5, output: 20, cached_input: 0.25 }\n";
    let config = Config::from_yaml(&yaml, env).unwrap();
    let price = config.pricing["gpt-4o-mini"];
    assert!(price.tiered());
    let tokens = |tier| {
        let t = price.tokens_at(tier);
        (t.input, t.output, t.cached_input)
    };
    assert_eq!(tokens(None), (1_250_000, 10_000_000, 125_000));
    assert_eq!(
        tokens(Some(ServiceTier::Default)),
        (1_250_000, 10_000_000, 125_000)
    );
    // A tier's cached input defaults to its own input price, discounted as
    // the standard one's is (a tenth here).
    assert_eq!(
        tokens(Some(ServiceTier::Flex)),
        (625_000, 5_000_000, 62_500)
    );
    assert_eq!(
        tokens(Some(ServiceTier::Priority)),
        (2_500_000, 20_000_000, 250_000)
    );
    // Not priced apart: the standard price.
    assert_eq!(price.tier(ServiceTier::Scale), None);
    assert_eq!(
        tokens(Some(ServiceTier::Scale)),
        (1_250_000, 10_000_000, 125_000)
    );
    // The target took its public model's price, tiers and all.
    let (_, route) = config.route("gpt-4o-mini").unwrap();
    assert_eq!(route.targets[0].price, Some(price));
    assert!(!Config::from_yaml(VALID, env)
        .unwrap()
        .pricing
        .values()
        .any(Price::tiered));

    for (tiers, problem) in [
        (
            "{ turbo: { input: 1, output: 2 } }",
            "pricing.gpt-4o-mini.service_tiers.turbo: unknown tier (use flex, priority or scale)",
        ),
        (
            "{ default: { input: 1, output: 2 } }",
            "pricing.gpt-4o-mini.service_tiers.default: the model's own input and output are the standard tier's prices",
        ),
        (
            "{ fast: { input: 1, output: 2 } }",
            "pricing.gpt-4o-mini.service_tiers.fast: OpenAI answers fast mode as priority",
        ),
        (
            "{ flex: { input: 1 } }",
            "pricing.gpt-4o-mini.service_tiers.flex: give input and output",
        ),
        (
            "{ flex: { input: 1, output: -2 } }",
            "pricing.gpt-4o-mini.service_tiers.flex.output: must be a non-negative price",
        ),
        (
            "{ flex: { input: 1, output: 2, per_request: 1 } }",
            "pricing.gpt-4o-mini.service_tiers.flex.per_request: unknown field",
        ),
        (
            "[flex]",
            "pricing.gpt-4o-mini.service_tiers: must be a mapping of tier",
        ),
    ] {
        let yaml = VALID.to_string()
            + &format!("pricing:\n  gpt-4o-mini: {{ input: 1, output: 2, service_tiers: {tiers} }}\n");
        let found = problems(&yaml);
        assert!(
            found.iter().any(|f| f.starts_with(problem)),
            "missing {problem:?} in {found:#?}"
        );
    }
    // A target's own price without tiers: served, and warned about.
    let yaml = VALID.to_string()
        + "pricing:\n  gpt-4o-mini: { input: 1, output: 2, service_tiers: { flex: { input: 0.5, output: 1 } } }\n  openai/gpt-4o-mini: { input: 1, output: 2 }\n";
    let warnings = Config::from_yaml(&yaml, env).unwrap().warnings();
    assert!(
        warnings.iter().any(|w| w.starts_with("pricing: 'openai/gpt-4o-mini' has no service_tiers though model 'gpt-4o-mini' prices tiers")),
        "{warnings:#?}"
    );
    let yaml = VALID.to_string()
        + "pricing:\n  gpt-4o-mini: { per_image: 0.04, service_tiers: { flex: { input: 1, output: 2 } } }\n";
    let found = problems(&yaml);
    let problem = "pricing.gpt-4o-mini.service_tiers: processing tiers price tokens";
    assert!(
        found.iter().any(|f| f.starts_with(problem)),
        "missing {problem:?} in {found:#?}"
    );
}
