//! The YAML configuration: schema, `${ENV}` interpolation and validation.
//!
//! Laid out as the loading goes: `raw` is the file format (serde structs,
//! every one with `deny_unknown_fields`), `env` interpolates `${VAR}`,
//! `validate` and `tenants` turn the raw sections into the `model` the
//! gateway runs on (provider references resolved to indices, key digests
//! parsed, URLs parsed, prices resolved per target), so nothing downstream
//! can see an invalid value. Loading never stops at the first mistake: every
//! problem is collected with the path of the key at fault
//! (`tenants[1].keys[0]: ...`) so `runestone check` can list them all.
mod cache;
mod callbacks;
mod env;
mod jobs;
pub mod keys;
mod model;
mod raw;
mod secrets;
mod telemetry;
mod tenants;
#[cfg(test)]
mod tests;
mod validate;

pub use cache::{CacheSettings, ModelCache};
pub use callbacks::{CallbackUrl, Callbacks};
pub use model::*;
pub use secrets::Secret;
pub use telemetry::TelemetrySettings;

use env::interpolate;
use raw::*;
use secrets::{literal_secrets, permission_warning};
use serde_yaml::Value;
use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use tenants::{validate_pricing, validate_tenants};
use validate::{
    validate_breaker, validate_failover, validate_models, validate_providers, validate_redis,
    validate_server,
};

/// One problem found in a config file, with the path of the key at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where: `providers[0].base_url`, or the empty string for the whole file.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file that was read.
    pub file: String,
    /// The problems, in file order as far as possible.
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} problem(s)", self.file, self.problems.len())?;
        for problem in &self.problems {
            write!(f, "\n  {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// The validated configuration the gateway runs on.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listener and process settings.
    pub server: ServerSettings,
    /// Providers, in config order.
    pub providers: Vec<ProviderSettings>,
    /// Model routes, in config order.
    pub models: Vec<ModelRoute>,
    /// Tenants, in config order.
    pub tenants: Vec<TenantSettings>,
    /// Prices per public model name.
    pub pricing: HashMap<String, Price>,
    /// Shared state, when configured.
    pub redis: Option<RedisSettings>,
    /// Circuit breaker settings.
    pub breaker: BreakerSettings,
    /// Most attempts one request makes, across targets and fallbacks.
    pub max_attempts: usize,
    /// The failover policy (`max_attempts` is its own, copied here).
    pub failover: FailoverSettings,
    /// Async job settings.
    pub jobs: JobSettings,
    /// Trace export, when configured.
    pub telemetry: Option<TelemetrySettings>,
    /// The response cache, when configured.
    pub cache: Option<CacheSettings>,
    /// Secrets written in the file itself rather than taken from `${ENV}`
    /// (or, for tenant keys, given as digests): their key paths.
    pub literal_secrets: Vec<String>,
    /// Warnings about the file itself (its permissions), found at load.
    pub file_warnings: Vec<String>,
    /// Model name -> route index; read on every request (foldhash: built
    /// from the config, so a client's names only look up).
    model_index: foldhash::HashMap<String, usize>,
}

impl Config {
    /// Reads, interpolates and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            problems: vec![Problem {
                path: String::new(),
                message: format!("cannot read the file: {e}"),
            }],
        })?;
        let mut config =
            Self::from_yaml(&text, |name| std::env::var(name).ok()).map_err(|problems| {
                ConfigError {
                    file: file.clone(),
                    problems,
                }
            })?;
        if let Some(warning) = permission_warning(path, &config.literal_secrets) {
            config.file_warnings.push(warning);
        }
        Ok(config)
    }

    /// Parses and validates YAML text; `env` looks up `${VAR}` values.
    pub fn from_yaml(
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, Vec<Problem>> {
        let mut problems = Vec::new();
        let mut root: Value = serde_yaml::from_str(text).map_err(|e| {
            vec![Problem {
                path: String::new(),
                message: format!("not valid YAML: {e}"),
            }]
        })?;
        let literal_secrets = literal_secrets(&root);
        interpolate(&mut root, "", &env, &mut problems);
        let Value::Mapping(root) = root else {
            problems.push(problem("", "the file must be a YAML mapping"));
            return Err(problems);
        };
        for key in root.keys() {
            let name = key.as_str().unwrap_or("?");
            if !TOP_LEVEL_KEYS.contains(&name) {
                problems.push(problem(
                    name,
                    format!("unknown key; expected one of {TOP_LEVEL_KEYS:?}"),
                ));
            }
        }
        let section = |name: &str| root.get(name).cloned().unwrap_or(Value::Null);

        let server = match section("server") {
            Value::Null => {
                problems.push(problem("server", "missing section"));
                None
            }
            value => deserialize::<RawServer>(value, "server", &mut problems)
                .and_then(|raw| validate_server(raw, &mut problems)),
        };
        let raw_providers: Vec<Option<RawProvider>> =
            list(section("providers"), "providers", &mut problems);
        let raw_models: Vec<Option<RawModel>> = list(section("models"), "models", &mut problems);
        let raw_tenants: Vec<Option<RawTenant>> =
            list(section("tenants"), "tenants", &mut problems);

        let (providers, provider_index) = validate_providers(raw_providers, &mut problems);
        let (mut models, model_index) = validate_models(raw_models, &provider_index, &mut problems);
        let tenants = validate_tenants(raw_tenants, &model_index, &mut problems);
        let pricing = validate_pricing(section("pricing"), &model_index, &providers, &mut problems);
        for route in &mut models {
            for target in &mut route.targets {
                // A provider that failed validation has no entry here (and
                // the config is refused anyway).
                let Some(provider) = providers.get(target.provider) else {
                    continue;
                };
                target.price = pricing
                    .get(&format!("{}/{}", provider.name, target.model))
                    .or_else(|| pricing.get(&route.name))
                    .copied();
            }
        }
        let breaker = match section("circuit_breaker") {
            Value::Null => Some(BreakerSettings::default()),
            value => deserialize::<RawBreaker>(value, "circuit_breaker", &mut problems)
                .map(|raw| validate_breaker(raw, &mut problems)),
        };
        let failover = match section("failover") {
            Value::Null => Some(FailoverSettings::default()),
            value => deserialize::<RawFailover>(value, "failover", &mut problems)
                .map(|raw| validate_failover(raw, &mut problems)),
        };
        let redis = match section("redis") {
            Value::Null => None,
            value => deserialize::<RawRedis>(value, "redis", &mut problems)
                .and_then(|raw| validate_redis(raw, &mut problems)),
        };

        let jobs = match section("jobs") {
            Value::Null => Some(JobSettings::default()),
            value => deserialize::<RawJobs>(value, "jobs", &mut problems)
                .map(|raw| jobs::validate_jobs(raw, &mut problems)),
        };
        let telemetry = match section("telemetry") {
            Value::Null => None,
            value => deserialize::<RawTelemetry>(value, "telemetry", &mut problems)
                .and_then(|raw| telemetry::validate_telemetry(raw, &mut problems)),
        };
        let cache = match section("cache") {
            Value::Null => None,
            value => deserialize::<RawCache>(value, "cache", &mut problems)
                .map(|raw| cache::validate_cache(raw, &mut problems)),
        };
        if cache.is_none() {
            for (i, route) in models.iter().enumerate() {
                if matches!(route.cache, ModelCache::Ttl(_)) {
                    problems.push(problem(
                        &format!("models[{i}].cache"),
                        "a model's cache TTL needs a top-level cache: section",
                    ));
                }
            }
        }
        match (server, breaker, failover, jobs) {
            (Some(server), Some(breaker), Some(failover), Some(jobs)) if problems.is_empty() => {
                Ok(Config {
                    server,
                    providers,
                    models,
                    tenants,
                    pricing,
                    redis,
                    breaker,
                    max_attempts: failover.max_attempts,
                    failover,
                    jobs,
                    telemetry,
                    cache,
                    literal_secrets,
                    file_warnings: Vec::new(),
                    model_index: model_index.into_iter().collect(),
                })
            }
            _ => Err(problems),
        }
    }

    /// Things that work but deserve the operator's attention.
    pub fn warnings(&self) -> Vec<String> {
        self.models
            .iter()
            .filter(|m| !self.pricing.contains_key(&m.name))
            .map(|m| format!("pricing: model '{}' has no price; it is served and counted in tokens, at no cost", m.name))
            .chain(self.providers.iter().filter_map(|p| {
                let key = p.api_key.as_ref()?.expose();
                let len = key.len();
                if len < crate::redact::MIN_REDACTED_KEY_LEN {
                    return Some(format!(
                        "providers: '{}' has an api_key of {len} characters, a placeholder rather than a key; it is not masked in what the provider sends back",
                        p.name
                    ));
                }
                // A word (`password`, `assistant`): masked wherever an
                // answer says it.
                key.bytes().all(|b| b.is_ascii_alphabetic()).then(|| format!(
                    "providers: '{}' has an api_key of letters only, which may be an ordinary word; it is masked with '*' wherever the provider's answers contain it (use the real key, or a placeholder under {} characters for a server that checks none)",
                    p.name,
                    crate::redact::MIN_REDACTED_KEY_LEN
                ))
            }))
            .chain(self.untiered_targets())
            .chain(self.file_warnings.iter().cloned())
            .collect()
    }

    /// Warnings for targets whose own `provider/model` price has no
    /// processing tiers while their public model's price has: on them,
    /// every tier is billed at that one price.
    fn untiered_targets(&self) -> impl Iterator<Item = String> + '_ {
        self.models.iter().flat_map(move |model| {
            let tiered = self.pricing.get(&model.name).is_some_and(Price::tiered);
            model.targets.iter().filter_map(move |target| {
                let own = target.price.filter(|_| tiered)?;
                (!own.tiered()).then(|| format!(
                    "pricing: '{}/{}' has no service_tiers though model '{}' prices tiers: requests it serves there are billed at its one price whatever tier",
                    self.providers[target.provider].name, target.model, model.name
                ))
            })
        })
    }

    /// The route for a public model name, with its index in [`Config::models`].
    pub fn route(&self, model: &str) -> Option<(usize, &ModelRoute)> {
        self.model_index.get(model).map(|&i| (i, &self.models[i]))
    }

    /// The `route_index`-th route and then its `fallbacks` the tenant may
    /// use, in order: what a request for it may be served by.
    pub fn routes_for(&self, tenant: usize, route_index: usize) -> Vec<(usize, &ModelRoute)> {
        let route = &self.models[route_index];
        std::iter::once(route_index)
            .chain(route.fallbacks.iter().copied())
            .filter(|&r| r == route_index || self.tenants[tenant].may_use(&self.models[r].name))
            .map(|r| (r, &self.models[r]))
            .collect()
    }

    /// The route's `context_fallbacks` the tenant may use, in order.
    pub fn context_routes_for(
        &self,
        tenant: usize,
        route_index: usize,
    ) -> Vec<(usize, &ModelRoute)> {
        self.models[route_index]
            .context_fallbacks
            .iter()
            .copied()
            .filter(|&r| self.tenants[tenant].may_use(&self.models[r].name))
            .map(|r| (r, &self.models[r]))
            .collect()
    }
}

pub(crate) fn problem(path: &str, message: impl Into<String>) -> Problem {
    Problem {
        path: path.to_string(),
        message: message.into(),
    }
}

pub(crate) fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}
