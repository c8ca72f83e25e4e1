//! Validation of the response cache: the `cache:` section, a model's
//! `cache:` (`false`, or its own `ttl_seconds`) and a tenant's `cache:
//! false`.

use super::raw::RawCache;
use super::{problem, Problem};
use serde_yaml::Value;
use std::time::Duration;

/// The response cache's settings (`cache:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheSettings {
    /// How long an answer is served from the cache.
    pub ttl: Duration,
    /// Answers larger than this (in bytes, as the client got them) are
    /// not stored.
    pub max_entry_bytes: usize,
    /// Without Redis: the most bytes the in-process store holds (the least
    /// recently used entries go first).
    pub max_memory_bytes: usize,
    /// Chat and text completions are cached only when `temperature` is 0
    /// or a `seed` is set (embeddings always are).
    pub only_deterministic: bool,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            ttl: Duration::from_secs(3600),
            max_entry_bytes: 1024 * 1024,
            max_memory_bytes: 256 * 1024 * 1024,
            only_deterministic: true,
        }
    }
}

/// A model's own cache setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ModelCache {
    /// As the `cache:` section says.
    #[default]
    Inherit,
    /// Never cached.
    Off,
    /// Cached this long.
    Ttl(Duration),
}

/// The longest TTL an entry may have.
const MAX_TTL_SECONDS: u64 = 365 * 86_400;

/// The cache settings from the raw section.
pub(super) fn validate_cache(raw: RawCache, problems: &mut Vec<Problem>) -> CacheSettings {
    let d = CacheSettings::default();
    let ttl = raw.ttl_seconds.unwrap_or(d.ttl.as_secs());
    if !(1..=MAX_TTL_SECONDS).contains(&ttl) {
        problems.push(problem(
            "cache.ttl_seconds",
            format!("must be between 1 and {MAX_TTL_SECONDS}"),
        ));
    }
    let max_entry = raw.max_entry_bytes.unwrap_or(d.max_entry_bytes);
    if !(1024..=64 * 1024 * 1024).contains(&max_entry) {
        problems.push(problem(
            "cache.max_entry_bytes",
            "must be between 1024 and 67108864",
        ));
    }
    let max_memory = raw.max_memory_bytes.unwrap_or(d.max_memory_bytes);
    if max_memory < max_entry {
        problems.push(problem(
            "cache.max_memory_bytes",
            "must be at least max_entry_bytes",
        ));
    }
    CacheSettings {
        ttl: Duration::from_secs(ttl),
        max_entry_bytes: max_entry,
        max_memory_bytes: max_memory,
        only_deterministic: raw.only_deterministic.unwrap_or(d.only_deterministic),
    }
}

/// A model's `cache:`: `false`, `true`, or `{ ttl_seconds: N }`.
pub(super) fn validate_model_cache(
    raw: Option<Value>,
    path: &str,
    problems: &mut Vec<Problem>,
) -> ModelCache {
    let path = format!("{path}.cache");
    let expected = "expected false, true or { ttl_seconds: N }";
    match raw {
        None | Some(Value::Bool(true)) => ModelCache::Inherit,
        Some(Value::Bool(false)) => ModelCache::Off,
        Some(Value::Mapping(map)) => {
            let mut ttl = None;
            for (key, value) in map {
                match (key.as_str(), value.as_u64()) {
                    (Some("ttl_seconds"), Some(secs)) if (1..=MAX_TTL_SECONDS).contains(&secs) => {
                        ttl = Some(Duration::from_secs(secs));
                    }
                    (Some("ttl_seconds"), _) => problems.push(problem(
                        &format!("{path}.ttl_seconds"),
                        format!("must be between 1 and {MAX_TTL_SECONDS}"),
                    )),
                    _ => problems.push(problem(&path, format!("unknown key; {expected}"))),
                }
            }
            ttl.map_or(ModelCache::Inherit, ModelCache::Ttl)
        }
        Some(_) => {
            problems.push(problem(&path, expected));
            ModelCache::Inherit
        }
    }
}
