//! Validation of the server, providers, models, breaker and Redis sections
//! into the model, every problem recorded with its key path.

use super::raw::*;
use super::*;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

pub(super) fn validate_server(
    raw: RawServer,
    problems: &mut Vec<Problem>,
) -> Option<ServerSettings> {
    let before = problems.len();
    let addr =
        |value: &str, path: &str, problems: &mut Vec<Problem>| match value.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                problems.push(problem(
                    path,
                    format!("'{value}' is not an IP:port address"),
                ));
                None
            }
        };
    let listen = addr(&raw.listen, "server.listen", problems);
    let metrics_listen = raw
        .metrics_listen
        .as_deref()
        .and_then(|m| addr(m, "server.metrics_listen", problems));
    let threads = raw.threads.unwrap_or(2);
    if threads == 0 || threads > 1024 {
        problems.push(problem("server.threads", "must be between 1 and 1024"));
    }
    let max_request_body_bytes = raw
        .max_request_body_bytes
        .unwrap_or(DEFAULT_MAX_REQUEST_BODY_BYTES);
    let max_request_header_bytes = raw
        .max_request_header_bytes
        .unwrap_or(DEFAULT_MAX_REQUEST_HEADER_BYTES);
    if !(1024..=1024 * 1024).contains(&max_request_header_bytes) {
        problems.push(problem(
            "server.max_request_header_bytes",
            "must be between 1024 and 1048576 (Pingora reads at most 1 MiB of headers)",
        ));
    }
    let client_send_timeout_seconds = raw
        .client_send_timeout_seconds
        .unwrap_or(DEFAULT_CLIENT_SEND_TIMEOUT_SECONDS);
    if !(1..=3600).contains(&client_send_timeout_seconds) {
        problems.push(problem(
            "server.client_send_timeout_seconds",
            "must be between 1 and 3600",
        ));
    }
    let client_idle_timeout_seconds = raw
        .client_idle_timeout_seconds
        .unwrap_or(DEFAULT_CLIENT_IDLE_TIMEOUT_SECONDS);
    if !(1..=3600).contains(&client_idle_timeout_seconds) {
        problems.push(problem(
            "server.client_idle_timeout_seconds",
            "must be between 1 and 3600",
        ));
    }
    let tls = raw.tls.map(|tls| {
        for (key, file) in [("cert", &tls.cert), ("key", &tls.key)] {
            if let Err(e) = std::fs::metadata(file) {
                problems.push(problem(
                    &format!("server.tls.{key}"),
                    format!("cannot read '{file}': {e}"),
                ));
            }
        }
        TlsFiles {
            cert: tls.cert,
            key: tls.key,
        }
    });
    let log_level = raw.log_level.unwrap_or_else(|| "info".into());
    if tracing_subscriber_level(&log_level).is_none() {
        problems.push(problem(
            "server.log_level",
            "must be one of error, warn, info, debug, trace",
        ));
    }
    if max_request_body_bytes == 0 {
        problems.push(problem(
            "server.max_request_body_bytes",
            "must be greater than 0",
        ));
    }
    let trusted_proxies = raw
        .trusted_proxies
        .iter()
        .enumerate()
        .filter_map(|(i, cidr)| {
            let parsed = cidr
                .parse::<ipnet::IpNet>()
                .or_else(|_| cidr.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
            parsed
                .map_err(|_| {
                    problems.push(problem(
                        &format!("server.trusted_proxies[{i}]"),
                        format!("'{cidr}' is not an address or CIDR (10.0.0.0/8, fd00::/8)"),
                    ))
                })
                .ok()
        })
        .collect();
    if problems.len() > before {
        return None;
    }
    let client_address_header = match raw.client_address_header.as_deref() {
        None | Some("x-forwarded-for") => ForwardedHeader::XForwardedFor,
        Some("forwarded") => ForwardedHeader::Forwarded,
        Some(other) => {
            problems.push(problem(
                "server.client_address_header",
                format!("'{other}' is not one of x-forwarded-for, forwarded"),
            ));
            return None;
        }
    };
    let listen = listen?;
    Some(ServerSettings {
        client_address_header,
        trusted_proxies,
        listen,
        metrics_listen,
        threads,
        max_request_body_bytes,
        max_request_header_bytes,
        grace_period_seconds: raw.grace_period_seconds.unwrap_or(30),
        client_send_timeout: Duration::from_secs(client_send_timeout_seconds),
        client_idle_timeout: Duration::from_secs(client_idle_timeout_seconds),
        pid_file: raw
            .pid_file
            .unwrap_or_else(|| format!("/tmp/runestone-{}.pid", listen.port())),
        tls,
        access_log: raw.access_log.unwrap_or(true),
        auth_failures_per_minute: raw.auth_failures_per_minute.unwrap_or(60),
        log_level,
        upgrade_sock: raw
            .upgrade_sock
            .unwrap_or_else(|| format!("/tmp/runestone-{}.sock", listen.port())),
    })
}

/// Whether `level` is a log level name.
pub(super) fn tracing_subscriber_level(level: &str) -> Option<&'static str> {
    ["error", "warn", "info", "debug", "trace"]
        .into_iter()
        .find(|l| l.eq_ignore_ascii_case(level))
}

/// Names used in labels, logs and Redis keys: short, no separators.
pub(super) fn is_identifier(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

pub(super) fn validate_providers(
    raw: Vec<Option<RawProvider>>,
    problems: &mut Vec<Problem>,
) -> (Vec<ProviderSettings>, HashMap<String, usize>) {
    let mut providers = Vec::new();
    let mut index = HashMap::new();
    for (i, raw) in raw.into_iter().enumerate() {
        let Some(raw) = raw else { continue };
        let path = format!("providers[{i}]");
        if !is_identifier(&raw.name) {
            problems.push(problem(
                &join(&path, "name"),
                "must be 1-64 characters of A-Z a-z 0-9 - _ .",
            ));
        }
        if index.contains_key(&raw.name) {
            problems.push(problem(
                &join(&path, "name"),
                format!("duplicate provider name '{}'", raw.name),
            ));
        }
        let kind = match raw.kind.as_str() {
            "openai" => Some(ProviderKind::OpenAi),
            "azure" => Some(ProviderKind::Azure),
            "anthropic" => Some(ProviderKind::Anthropic),
            other => {
                problems.push(problem(
                    &join(&path, "kind"),
                    format!("unknown kind '{other}'; supported: openai, azure, anthropic"),
                ));
                None
            }
        };
        match (kind, &raw.api_version) {
            (Some(ProviderKind::Azure), None) => problems.push(problem(
                &join(&path, "api_version"),
                "an azure provider needs api_version (for example \"2024-10-21\")",
            )),
            (Some(ProviderKind::OpenAi | ProviderKind::Anthropic), Some(_)) => {
                problems.push(problem(
                    &join(&path, "api_version"),
                    "only azure providers take api_version",
                ))
            }
            (_, Some(v))
                if v.is_empty() || !v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') =>
            {
                problems.push(problem(
                    &join(&path, "api_version"),
                    "must be letters, digits and '-'",
                ))
            }
            _ => {}
        }
        let base_url = BaseUrl::parse(&raw.base_url)
            .map_err(|e| problems.push(problem(&join(&path, "base_url"), e)))
            .ok();
        let weight = raw.weight.unwrap_or(1);
        if weight == 0 {
            problems.push(problem(&join(&path, "weight"), "must be at least 1"));
        }
        let api_key = raw.api_key.filter(|k| !k.is_empty()).map(Secret);
        if let Some(key) = &api_key {
            // Sent as a header value: no control characters (a stray
            // newline from a secret file would fail every request).
            if key
                .expose()
                .bytes()
                .any(|b| b.is_ascii_control() || !b.is_ascii())
            {
                problems.push(problem(
                    &join(&path, "api_key"),
                    "must be printable ASCII (no newline or other control character)",
                ));
            } else if key.expose().trim() != key.expose() {
                // A header value loses them: the provider would get (and
                // might echo) a key other than the one masked.
                problems.push(problem(
                    &join(&path, "api_key"),
                    "must not begin or end with a space",
                ));
            }
        }
        let health_check = raw
            .health_check
            .map(|hc| validate_health_check(hc, &join(&path, "health_check"), problems));
        let timeouts = validate_timeouts(
            raw.timeouts.unwrap_or_default(),
            &join(&path, "timeouts"),
            problems,
        );
        if let (Some(kind), Some(base_url)) = (kind, base_url) {
            // Printable ASCII (checked above) is a valid header value.
            let credential = api_key
                .as_ref()
                .and_then(|key| crate::providers::credential(kind, key.expose()).ok());
            let redact_key = api_key
                .as_ref()
                .and_then(|key| crate::redact::RedactKey::new(key.expose()));
            index.insert(raw.name.clone(), providers.len());
            providers.push(ProviderSettings {
                name: raw.name,
                kind,
                base_url,
                api_key,
                credential,
                redact_key,
                weight,
                api_version: raw.api_version,
                health_check,
                timeouts,
                supports_prefill: raw
                    .supports_prefill
                    .unwrap_or(kind == ProviderKind::Anthropic),
            });
        } else {
            // Keep the name known so models referring to it do not add a
            // second, misleading "unknown provider" problem.
            index.entry(raw.name).or_insert(usize::MAX);
        }
    }
    if providers.is_empty() && problems.is_empty() {
        problems.push(problem("providers", "at least one provider is required"));
    }
    (providers, index)
}

pub(super) fn validate_models(
    raw: Vec<Option<RawModel>>,
    providers: &HashMap<String, usize>,
    problems: &mut Vec<Problem>,
) -> (Vec<ModelRoute>, HashMap<String, usize>) {
    let mut models = Vec::new();
    let mut index = HashMap::new();
    let mut fallback_names = Vec::new();
    for (i, raw) in raw.into_iter().enumerate() {
        let Some(raw) = raw else { continue };
        let path = format!("models[{i}]");
        if raw.name.trim().is_empty() || raw.name.len() > 256 {
            problems.push(problem(&join(&path, "name"), "must be 1-256 characters"));
        }
        if index.contains_key(&raw.name) {
            problems.push(problem(
                &join(&path, "name"),
                format!("duplicate model name '{}'", raw.name),
            ));
        }
        let strategy = match raw.strategy.as_deref().unwrap_or("round_robin") {
            "round_robin" => Strategy::RoundRobin,
            "weighted" => Strategy::Weighted,
            "least_latency" => Strategy::LeastLatency,
            "priority" => Strategy::Priority,
            "cheapest" => Strategy::Cheapest,
            other => {
                problems.push(problem(
                    &join(&path, "strategy"),
                    format!("unknown strategy '{other}'; supported: round_robin, weighted, least_latency, priority, cheapest"),
                ));
                Strategy::RoundRobin
            }
        };
        if raw.targets.is_empty() {
            problems.push(problem(
                &join(&path, "targets"),
                "at least one target is required",
            ));
        }
        let mut targets = Vec::new();
        for (t, target) in raw.targets.into_iter().enumerate() {
            let tpath = format!("{path}.targets[{t}]");
            match providers.get(&target.provider) {
                Some(&p) => targets.push(Target {
                    provider: p,
                    model: target.model.unwrap_or_else(|| raw.name.clone()),
                    price: None,
                }),
                None => problems.push(problem(
                    &join(&tpath, "provider"),
                    format!("unknown provider '{}'", target.provider),
                )),
            }
        }
        index.insert(raw.name.clone(), models.len());
        let cache = super::cache::validate_model_cache(raw.cache, &path, problems);
        fallback_names.push((path, raw.fallbacks, raw.context_fallbacks));
        models.push(ModelRoute {
            name: raw.name,
            strategy,
            targets,
            fallbacks: Vec::new(),
            context_fallbacks: Vec::new(),
            resume_streams: raw.resume_streams.unwrap_or(true),
            cache,
        });
    }
    // Fallbacks may name models defined later in the file.
    for (route, (path, names, context)) in models.iter_mut().zip(fallback_names) {
        for (key, names) in [("fallbacks", names), ("context_fallbacks", context)] {
            for (f, name) in names.iter().enumerate() {
                let resolved = match index.get(name) {
                    Some(&i) if *name != route.name => i,
                    Some(_) => {
                        problems.push(problem(
                            &format!("{path}.{key}[{f}]"),
                            "a model cannot fall back to itself",
                        ));
                        continue;
                    }
                    None => {
                        problems.push(problem(
                            &format!("{path}.{key}[{f}]"),
                            format!("unknown model '{name}'"),
                        ));
                        continue;
                    }
                };
                match key {
                    "fallbacks" => route.fallbacks.push(resolved),
                    _ => route.context_fallbacks.push(resolved),
                }
            }
        }
    }
    if models.is_empty() && problems.is_empty() {
        problems.push(problem("models", "at least one model is required"));
    }
    (models, index)
}

pub(super) fn validate_health_check(
    raw: RawHealthCheck,
    path: &str,
    problems: &mut Vec<Problem>,
) -> HealthCheckSettings {
    if !raw.path.starts_with('/') {
        problems.push(problem(
            &join(path, "path"),
            "must start with '/' (it is relative to base_url)",
        ));
    }
    let interval = raw.interval_seconds.unwrap_or(10);
    if !(1..=3600).contains(&interval) {
        problems.push(problem(
            &join(path, "interval_seconds"),
            "must be between 1 and 3600",
        ));
    }
    let timeout_ms = raw.timeout_ms.unwrap_or(2000);
    if !(1..=60_000).contains(&timeout_ms) {
        problems.push(problem(
            &join(path, "timeout_ms"),
            "must be between 1 and 60000",
        ));
    }
    let threshold =
        |value: Option<usize>, key: &str, default: usize, problems: &mut Vec<Problem>| {
            let n = value.unwrap_or(default);
            if !(1..=100).contains(&n) {
                problems.push(problem(&join(path, key), "must be between 1 and 100"));
            }
            n
        };
    HealthCheckSettings {
        path: raw.path,
        interval: Duration::from_secs(interval),
        healthy_threshold: threshold(raw.healthy_threshold, "healthy_threshold", 1, problems),
        unhealthy_threshold: threshold(raw.unhealthy_threshold, "unhealthy_threshold", 2, problems),
        timeout: Duration::from_millis(timeout_ms),
    }
}

pub(super) fn validate_timeouts(
    raw: RawTimeouts,
    path: &str,
    problems: &mut Vec<Problem>,
) -> Timeouts {
    let defaults = Timeouts::default();
    let mut ms = |value: Option<u64>, key: &str, default: Duration| match value {
        Some(0) => {
            problems.push(problem(&join(path, key), "must be at least 1 ms"));
            default
        }
        Some(v) => Duration::from_millis(v),
        None => default,
    };
    Timeouts {
        connect: ms(raw.connect_ms, "connect_ms", defaults.connect),
        first_byte: ms(raw.first_byte_ms, "first_byte_ms", defaults.first_byte),
        first_token: ms(raw.first_token_ms, "first_token_ms", defaults.first_token),
        idle: ms(raw.idle_ms, "idle_ms", defaults.idle),
        total: ms(raw.total_ms, "total_ms", defaults.total),
    }
}

pub(super) fn validate_breaker(raw: RawBreaker, problems: &mut Vec<Problem>) -> BreakerSettings {
    let d = BreakerSettings::default();
    let mut positive = |value: Option<u64>, key: &str, default: u64| {
        let v = value.unwrap_or(default);
        if v == 0 {
            problems.push(problem(
                &format!("circuit_breaker.{key}"),
                "must be at least 1",
            ));
        }
        v
    };
    let open = positive(raw.open_seconds, "open_seconds", d.open.as_secs());
    let settings = BreakerSettings {
        consecutive_failures: positive(
            raw.consecutive_failures.map(u64::from),
            "consecutive_failures",
            5,
        ) as u32,
        open: Duration::from_secs(open),
        // Unset, it is at least open_seconds (a config written when the
        // default was longer stays valid).
        max_open: Duration::from_secs(positive(
            raw.max_open_seconds,
            "max_open_seconds",
            d.max_open.as_secs().max(open),
        )),
        half_open_probes: positive(raw.half_open_probes.map(u64::from), "half_open_probes", 1)
            as u32,
        probe_timeout: Duration::from_secs(positive(
            raw.probe_timeout_seconds,
            "probe_timeout_seconds",
            d.probe_timeout.as_secs(),
        )),
        rate_limit_cooldown: Duration::from_secs(
            raw.rate_limit_cooldown_seconds
                .unwrap_or(d.rate_limit_cooldown.as_secs()),
        ),
    };
    if settings.max_open < settings.open {
        problems.push(problem(
            "circuit_breaker.max_open_seconds",
            "must not be less than open_seconds",
        ));
    }
    settings
}

pub(super) fn validate_redis(raw: RawRedis, problems: &mut Vec<Problem>) -> Option<RedisSettings> {
    let before = problems.len();
    let target = match (raw.url, raw.cluster_nodes, raw.sentinel) {
        (Some(url), None, None) => {
            check_redis_url("redis.url", &url, problems);
            RedisTarget::Single { url: Secret(url) }
        }
        (None, Some(nodes), None) => {
            if nodes.is_empty() {
                problems.push(problem(
                    "redis.cluster_nodes",
                    "must name at least one node",
                ));
            }
            for (i, node) in nodes.iter().enumerate() {
                let path = format!("redis.cluster_nodes[{i}]");
                check_redis_url(&path, node, problems);
                let db = url::Url::parse(node)
                    .ok()
                    .map(|u| u.path().trim_matches('/').to_owned());
                if db.is_some_and(|db| !db.is_empty() && db != "0") {
                    problems.push(problem(&path, "a cluster has only database 0"));
                }
            }
            same_scheme("redis.cluster_nodes", &nodes, problems);
            RedisTarget::Cluster {
                nodes: nodes.into_iter().map(Secret).collect(),
            }
        }
        (None, None, Some(sentinel)) => {
            if raw.username.is_some() || raw.password.is_some() {
                problems.push(problem(
                    "redis.password",
                    "with sentinel, the primary's credentials are sentinel.master_username and master_password",
                ));
            }
            if !is_identifier(&sentinel.master_name) {
                problems.push(problem(
                    "redis.sentinel.master_name",
                    "must be 1-64 characters of A-Z a-z 0-9 - _ .",
                ));
            }
            if sentinel.nodes.is_empty() {
                problems.push(problem(
                    "redis.sentinel.nodes",
                    "must name at least one sentinel",
                ));
            }
            for (i, node) in sentinel.nodes.iter().enumerate() {
                check_redis_url(&format!("redis.sentinel.nodes[{i}]"), node, problems);
            }
            same_scheme("redis.sentinel.nodes", &sentinel.nodes, problems);
            let db = sentinel.db.unwrap_or(0);
            if !(0..=15).contains(&db) {
                problems.push(problem("redis.sentinel.db", "must be between 0 and 15"));
            }
            RedisTarget::Sentinel {
                master_name: sentinel.master_name,
                nodes: sentinel.nodes.into_iter().map(Secret).collect(),
                username: sentinel.username,
                password: sentinel.password.map(Secret),
                master_username: sentinel.master_username,
                master_password: sentinel.master_password.map(Secret),
                db,
            }
        }
        _ => {
            problems.push(problem(
                "redis",
                "needs exactly one of url, cluster_nodes and sentinel",
            ));
            return None;
        }
    };
    let tls = redis_tls(&raw.ca_file, &raw.client_cert, &raw.client_key, problems);
    if (tls.ca.is_some() || tls.client.is_some()) && !target.uses_tls() {
        problems.push(problem(
            "redis.ca_file",
            "ca_file, client_cert and client_key need rediss:// endpoints",
        ));
    }
    let key_prefix = raw.key_prefix.unwrap_or_else(|| "runestone".into());
    if !is_identifier(&key_prefix) {
        problems.push(problem(
            "redis.key_prefix",
            "must be 1-64 characters of A-Z a-z 0-9 - _ .",
        ));
    }
    let timeout_ms = raw.timeout_ms.unwrap_or(50);
    if !(1..=10_000).contains(&timeout_ms) {
        problems.push(problem("redis.timeout_ms", "must be between 1 and 10000"));
    }
    let lease = raw.lease.map(|lease| {
        if !(lease.share > 0.0 && lease.share <= 0.5) {
            problems.push(problem(
                "redis.lease.share",
                "must be more than 0 and at most 0.5",
            ));
        }
        let ms = lease.ms.unwrap_or(1000);
        if !(100..=10_000).contains(&ms) {
            problems.push(problem("redis.lease.ms", "must be between 100 and 10000"));
        }
        LeaseSettings {
            share: lease.share,
            hold: std::time::Duration::from_millis(ms),
        }
    });
    (problems.len() == before).then(|| RedisSettings {
        target,
        tls,
        username: raw.username,
        password: raw.password.map(Secret),
        key_prefix,
        timeout: std::time::Duration::from_millis(timeout_ms),
        lease,
    })
}

/// A Redis URL the client can use as written: `redis://` or `rediss://`
/// with a host, nothing that turns certificate checks off.
fn check_redis_url(path: &str, text: &str, problems: &mut Vec<Problem>) {
    let usable = match url::Url::parse(text) {
        Ok(url) => {
            matches!(url.scheme(), "redis" | "rediss")
                && url.host().is_some()
                && url.fragment().is_none()
                && redis::IntoConnectionInfo::into_connection_info(text).is_ok()
        }
        Err(_) => false,
    };
    if !usable {
        // The URL itself is not repeated: it may hold a password.
        problems.push(problem(
            path,
            "must be a redis:// or rediss:// URL with a host and no #fragment (a password with # / ? or @ goes in redis.password, or percent-encoded)",
        ));
    }
}

/// Nodes of one deployment all use TLS, or none does.
fn same_scheme(path: &str, urls: &[String], problems: &mut Vec<Problem>) {
    let tls = urls
        .iter()
        .filter(|u| url::Url::parse(u).is_ok_and(|u| u.scheme() == "rediss"))
        .count();
    if tls != 0 && tls != urls.len() {
        problems.push(problem(path, "mixes redis:// and rediss:// nodes"));
    }
}

/// Reads the PEM files TLS to Redis names.
fn redis_tls(
    ca_file: &Option<String>,
    client_cert: &Option<String>,
    client_key: &Option<String>,
    problems: &mut Vec<Problem>,
) -> RedisTls {
    let read = |key: &str, file: &str, marker: &str, problems: &mut Vec<Problem>| {
        match std::fs::read_to_string(file) {
            Ok(text) if text.contains(marker) => Some(text),
            Ok(_) => {
                problems.push(problem(
                    &format!("redis.{key}"),
                    format!("'{file}' holds no PEM {}", marker.trim_matches('-')),
                ));
                None
            }
            Err(e) => {
                problems.push(problem(
                    &format!("redis.{key}"),
                    format!("cannot read '{file}': {e}"),
                ));
                None
            }
        }
    };
    let ca = ca_file
        .as_deref()
        .and_then(|f| read("ca_file", f, "-----BEGIN CERTIFICATE-----", problems))
        .map(String::into_bytes);
    let client = match (client_cert, client_key) {
        (Some(cert), Some(key)) => {
            let cert = read("client_cert", cert, "-----BEGIN CERTIFICATE-----", problems);
            let key = read("client_key", key, "PRIVATE KEY-----", problems);
            cert.zip(key)
                .map(|(cert, key)| (cert.into_bytes(), Secret(key)))
        }
        (None, None) => None,
        _ => {
            problems.push(problem(
                "redis.client_cert",
                "client_cert and client_key go together",
            ));
            None
        }
    };
    RedisTls { ca, client }
}

pub(super) fn validate_failover(raw: RawFailover, problems: &mut Vec<Problem>) -> FailoverSettings {
    let d = FailoverSettings::default();
    let max_attempts = raw.max_attempts.unwrap_or(d.max_attempts);
    if !(1..=16).contains(&max_attempts) {
        problems.push(problem("failover.max_attempts", "must be between 1 and 16"));
    }
    let max_retry_wait_ms = raw
        .max_retry_wait_ms
        .unwrap_or(d.max_retry_wait.as_millis() as u64);
    if max_retry_wait_ms > 60_000 {
        problems.push(problem(
            "failover.max_retry_wait_ms",
            "must be at most 60000 (a client waits that long)",
        ));
    }
    let same_deployment_retries = raw
        .same_deployment_retries
        .unwrap_or(d.same_deployment_retries);
    if same_deployment_retries > 3 {
        problems.push(problem(
            "failover.same_deployment_retries",
            "must be between 0 and 3",
        ));
    }
    let delay_ms = raw
        .same_deployment_delay_ms
        .unwrap_or(d.same_deployment_delay.as_millis() as u64);
    if delay_ms > 10_000 {
        problems.push(problem(
            "failover.same_deployment_delay_ms",
            "must be at most 10000",
        ));
    }
    FailoverSettings {
        max_attempts,
        max_retry_wait: Duration::from_millis(max_retry_wait_ms),
        same_deployment_retries,
        same_deployment_delay: Duration::from_millis(delay_ms),
    }
}
