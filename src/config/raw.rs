//! The file format: serde structs that mirror the YAML, every one with
//! `deny_unknown_fields`, and the helpers that deserialise a section while
//! recording each problem with its key path.

use super::{join, problem, Problem};
use serde::Deserialize;
use serde_yaml::Value;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) listen: String,
    #[serde(default)]
    pub(super) metrics_listen: Option<String>,
    #[serde(default)]
    pub(super) threads: Option<usize>,
    #[serde(default)]
    pub(super) max_request_body_bytes: Option<usize>,
    #[serde(default)]
    pub(super) max_request_header_bytes: Option<usize>,
    #[serde(default)]
    pub(super) grace_period_seconds: Option<u64>,
    #[serde(default)]
    pub(super) client_send_timeout_seconds: Option<u64>,
    #[serde(default)]
    pub(super) client_idle_timeout_seconds: Option<u64>,
    #[serde(default)]
    pub(super) pid_file: Option<String>,
    #[serde(default)]
    pub(super) upgrade_sock: Option<String>,
    #[serde(default)]
    pub(super) tls: Option<RawTls>,
    #[serde(default)]
    pub(super) access_log: Option<bool>,
    #[serde(default)]
    pub(super) log_level: Option<String>,
    #[serde(default)]
    pub(super) auth_failures_per_minute: Option<u32>,
    #[serde(default)]
    pub(super) trusted_proxies: Vec<String>,
    #[serde(default)]
    pub(super) client_address_header: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) cert: String,
    pub(super) key: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProvider {
    pub(super) name: String,
    #[serde(default = "default_kind")]
    pub(super) kind: String,
    pub(super) base_url: String,
    #[serde(default)]
    pub(super) api_key: Option<String>,
    #[serde(default)]
    pub(super) weight: Option<u32>,
    #[serde(default)]
    pub(super) api_version: Option<String>,
    #[serde(default)]
    pub(super) health_check: Option<RawHealthCheck>,
    #[serde(default)]
    pub(super) timeouts: Option<RawTimeouts>,
    #[serde(default)]
    pub(super) supports_prefill: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealthCheck {
    pub(super) path: String,
    #[serde(default)]
    pub(super) interval_seconds: Option<u64>,
    #[serde(default)]
    pub(super) healthy_threshold: Option<usize>,
    #[serde(default)]
    pub(super) unhealthy_threshold: Option<usize>,
    #[serde(default)]
    pub(super) timeout_ms: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTimeouts {
    #[serde(default)]
    pub(super) connect_ms: Option<u64>,
    #[serde(default)]
    pub(super) first_byte_ms: Option<u64>,
    #[serde(default)]
    pub(super) first_token_ms: Option<u64>,
    #[serde(default)]
    pub(super) idle_ms: Option<u64>,
    #[serde(default)]
    pub(super) total_ms: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBreaker {
    #[serde(default)]
    pub(super) consecutive_failures: Option<u32>,
    #[serde(default)]
    pub(super) open_seconds: Option<u64>,
    #[serde(default)]
    pub(super) max_open_seconds: Option<u64>,
    #[serde(default)]
    pub(super) half_open_probes: Option<u32>,
    #[serde(default)]
    pub(super) probe_timeout_seconds: Option<u64>,
    #[serde(default)]
    pub(super) rate_limit_cooldown_seconds: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFailover {
    #[serde(default)]
    pub(super) max_attempts: Option<usize>,
    #[serde(default)]
    pub(super) max_retry_wait_ms: Option<u64>,
    #[serde(default)]
    pub(super) same_deployment_retries: Option<u32>,
    #[serde(default)]
    pub(super) same_deployment_delay_ms: Option<u64>,
}

pub(super) fn default_kind() -> String {
    "openai".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTarget {
    pub(super) provider: String,
    #[serde(default)]
    pub(super) model: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawModel {
    pub(super) name: String,
    #[serde(default)]
    pub(super) strategy: Option<String>,
    pub(super) targets: Vec<RawTarget>,
    #[serde(default)]
    pub(super) fallbacks: Vec<String>,
    #[serde(default)]
    pub(super) context_fallbacks: Vec<String>,
    #[serde(default)]
    pub(super) resume_streams: Option<bool>,
    #[serde(default)]
    pub(super) cache: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTenant {
    pub(super) id: String,
    pub(super) keys: Vec<String>,
    #[serde(default)]
    pub(super) models: Option<Vec<String>>,
    #[serde(default)]
    pub(super) limits: Option<RawLimits>,
    #[serde(default)]
    pub(super) overflow: Option<RawTenantOverflow>,
    #[serde(default)]
    pub(super) cache: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTenantOverflow {
    #[serde(default)]
    pub(super) enabled: bool,
    #[serde(default)]
    pub(super) max_wait_seconds: Option<u64>,
    #[serde(default)]
    pub(super) max_parked: Option<usize>,
    #[serde(default)]
    pub(super) weight: Option<u32>,
    #[serde(default)]
    pub(super) callbacks: Option<RawCallbacks>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCallbacks {
    pub(super) allowed_urls: Vec<String>,
    pub(super) secret: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawJobs {
    #[serde(default)]
    pub(super) result_ttl_seconds: Option<u64>,
    #[serde(default)]
    pub(super) visibility_timeout_seconds: Option<u64>,
    #[serde(default)]
    pub(super) in_process_max_jobs: Option<usize>,
    #[serde(default)]
    pub(super) in_process_max_bytes: Option<usize>,
    #[serde(default)]
    pub(super) idempotency_window_seconds: Option<u64>,
    #[serde(default)]
    pub(super) max_attempts: Option<u32>,
    #[serde(default)]
    pub(super) max_age_seconds: Option<u64>,
    #[serde(default)]
    pub(super) timeout_seconds: Option<u64>,
    #[serde(default)]
    pub(super) retry_backoff_ms: Option<u64>,
    #[serde(default)]
    pub(super) retry_backoff_max_ms: Option<u64>,
    #[serde(default)]
    pub(super) concurrency: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCache {
    #[serde(default)]
    pub(super) ttl_seconds: Option<u64>,
    #[serde(default)]
    pub(super) max_entry_bytes: Option<usize>,
    #[serde(default)]
    pub(super) max_memory_bytes: Option<usize>,
    #[serde(default)]
    pub(super) only_deterministic: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTelemetry {
    pub(super) otlp_endpoint: String,
    #[serde(default)]
    pub(super) service_name: Option<String>,
    #[serde(default)]
    pub(super) sample_ratio: Option<f64>,
    #[serde(default)]
    pub(super) headers: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default)]
    pub(super) capture_content: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    #[serde(default)]
    pub(super) requests_per_minute: Option<u32>,
    #[serde(default)]
    pub(super) tokens_per_minute: Option<u64>,
    #[serde(default)]
    pub(super) max_concurrent: Option<u32>,
    #[serde(default)]
    pub(super) budget_usd: Option<RawBudget>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBudget {
    pub(super) amount: f64,
    pub(super) period: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRedis {
    #[serde(default)]
    pub(super) url: Option<String>,
    #[serde(default)]
    pub(super) cluster_nodes: Option<Vec<String>>,
    #[serde(default)]
    pub(super) sentinel: Option<RawSentinel>,
    #[serde(default)]
    pub(super) ca_file: Option<String>,
    #[serde(default)]
    pub(super) client_cert: Option<String>,
    #[serde(default)]
    pub(super) client_key: Option<String>,
    #[serde(default)]
    pub(super) username: Option<String>,
    #[serde(default)]
    pub(super) password: Option<String>,
    #[serde(default)]
    pub(super) key_prefix: Option<String>,
    #[serde(default)]
    pub(super) timeout_ms: Option<u64>,
    #[serde(default)]
    pub(super) lease: Option<RawLease>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLease {
    pub(super) share: f64,
    #[serde(default)]
    pub(super) ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSentinel {
    pub(super) master_name: String,
    pub(super) nodes: Vec<String>,
    #[serde(default)]
    pub(super) username: Option<String>,
    #[serde(default)]
    pub(super) password: Option<String>,
    #[serde(default)]
    pub(super) master_username: Option<String>,
    #[serde(default)]
    pub(super) master_password: Option<String>,
    #[serde(default)]
    pub(super) db: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPrice {
    #[serde(default)]
    pub(super) input: Option<f64>,
    #[serde(default)]
    pub(super) output: Option<f64>,
    #[serde(default)]
    pub(super) cached_input: Option<f64>,
    #[serde(default)]
    pub(super) per_request: Option<f64>,
    #[serde(default)]
    pub(super) per_image: Option<f64>,
    #[serde(default)]
    pub(super) per_audio_second: Option<f64>,
    #[serde(default)]
    pub(super) per_1m_characters: Option<f64>,
    /// Processing tiers priced apart from the standard one, read by name.
    #[serde(default)]
    pub(super) service_tiers: Option<serde_yaml::Value>,
}

/// One processing tier's token prices (USD per 1M tokens).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTierPrice {
    #[serde(default)]
    pub(super) input: Option<f64>,
    #[serde(default)]
    pub(super) output: Option<f64>,
    #[serde(default)]
    pub(super) cached_input: Option<f64>,
}

pub(super) const TOP_LEVEL_KEYS: &[&str] = &[
    "server",
    "redis",
    "providers",
    "models",
    "pricing",
    "circuit_breaker",
    "failover",
    "jobs",
    "telemetry",
    "cache",
    "tenants",
];

pub(super) fn deserialize<T: serde::de::DeserializeOwned>(
    value: Value,
    path: &str,
    problems: &mut Vec<Problem>,
) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(v) => Some(v),
        Err(e) => {
            let inner = e.path().to_string();
            let at = if inner == "." {
                path.to_string()
            } else {
                join(path, &inner)
            };
            problems.push(problem(&at, without_values(&e.into_inner().to_string())));
            None
        }
    }
}

/// A serde message with the quoted values it echoes masked: a value of the
/// wrong type may be a secret (a key or a URL with its password, after
/// `${ENV}` substitution), and problems are printed.
fn without_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut quoted = false;
    for c in message.chars() {
        match (c, quoted) {
            ('"', false) => {
                quoted = true;
                out.push_str("\"…");
            }
            ('"', true) => {
                quoted = false;
                out.push('"');
            }
            (_, true) => {}
            (c, false) => out.push(c),
        }
    }
    out
}

/// Deserialises each item of a list section on its own, so one bad item
/// does not hide the problems of the others.
pub(super) fn list<T: serde::de::DeserializeOwned>(
    value: Value,
    path: &str,
    problems: &mut Vec<Problem>,
) -> Vec<Option<T>> {
    match value {
        Value::Null => Vec::new(),
        Value::Sequence(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| deserialize(item, &format!("{path}[{i}]"), problems))
            .collect(),
        _ => {
            problems.push(problem(path, "must be a list"));
            Vec::new()
        }
    }
}
