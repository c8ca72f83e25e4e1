//! The response cache: identical requests of a tenant answered once.
//!
//! An entry is the JSON answer (whichever form it came in), when it was
//! stored and what the provider call cost (what a hit saves). Entries live
//! in Redis when it is configured (shared by every instance, under the
//! tenant's hash tag, expiring by TTL), else in process (bounded by bytes,
//! least recently used out first). A Redis error or timeout is a miss,
//! never an error for the client.
//!
//! `key` makes the key (tenant, model, endpoint, canonical body);
//! `replay` turns entries into answers and answers into entries; `flight`
//! coalesces concurrent identical requests into one provider call.

pub mod flight;
pub mod key;
pub mod replay;

pub use flight::{Flights, Form, Join, Landed};
pub use key::Key;

use crate::config::CacheSettings;
use crate::redis_conn::RedisConnection;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A stored answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    /// When it was stored (Unix milliseconds): the `age` of a hit.
    pub stored_at_ms: u64,
    /// What the provider call cost, in pico-dollars: what a hit saves.
    pub cost_pusd: i64,
    /// Whether the answer can be replayed as a stream exactly (a JSON
    /// answer with fields a stream's chunks cannot carry cannot).
    #[serde(default)]
    pub streamable: bool,
    /// The JSON answer (an object), as written from its parsed form:
    /// compact, members in order. Kept unparsed: a JSON hit copies it with
    /// a fresh id ([`replay::render_json`]) and only a stream replay
    /// parses it.
    pub answer: Box<RawValue>,
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    now_ms() / 1000
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// An entry in process: its bytes (as in Redis) and when it expires.
struct Local {
    bytes: Arc<[u8]>,
    expires_at: Instant,
}

/// Where entries live.
enum Store {
    Local {
        entries: Mutex<lru::LruCache<Key, Local>>,
        max_bytes: usize,
        bytes: Mutex<usize>,
    },
    Redis {
        conn: Arc<RedisConnection>,
        prefix: String,
        timeout: Duration,
    },
}

/// The cache: the store and the flights in the air. Cheap to clone.
#[derive(Clone)]
pub struct Cache {
    store: Arc<Store>,
    /// Concurrent identical requests, coalesced.
    pub flights: Arc<Flights>,
    /// The settings it runs with.
    pub settings: CacheSettings,
}

impl Cache {
    /// A cache with `settings`, in Redis when `redis` is given (its
    /// connection, key prefix and call timeout), else in process.
    pub fn new(
        settings: CacheSettings,
        redis: Option<(Arc<RedisConnection>, String, Duration)>,
    ) -> Self {
        let store = match redis {
            Some((conn, prefix, timeout)) => Store::Redis {
                conn,
                prefix,
                timeout,
            },
            None => Store::Local {
                entries: Mutex::new(lru::LruCache::unbounded()),
                max_bytes: settings.max_memory_bytes,
                bytes: Mutex::new(0),
            },
        };
        Cache {
            store: Arc::new(store),
            flights: Arc::default(),
            settings,
        }
    }

    fn redis_key(prefix: &str, tenant: &str, key: &Key) -> String {
        format!("{prefix}:{{{tenant}}}:cache:{}", hex::encode(key))
    }

    /// The entry for `key` of `tenant` (its config id), if stored and
    /// younger than `ttl` (the TTL now: an entry stored under a longer one
    /// is not served past it). Anything Redis does not answer in time is a
    /// miss.
    pub async fn get(&self, tenant: &str, key: &Key, ttl: Duration) -> Option<Entry> {
        let bytes: Arc<[u8]> = match &*self.store {
            Store::Local { entries, bytes, .. } => {
                let mut entries = entries.lock().unwrap_or_else(|e| e.into_inner());
                let found = entries.get(key)?;
                if found.expires_at <= Instant::now() {
                    let gone = entries.pop(key).map_or(0, |e| e.bytes.len());
                    *bytes.lock().unwrap_or_else(|e| e.into_inner()) -= gone;
                    return None;
                }
                found.bytes.clone()
            }
            Store::Redis {
                conn,
                prefix,
                timeout,
            } => {
                let mut cmd = redis::cmd("GET");
                cmd.arg(Self::redis_key(prefix, tenant, key));
                let found: Option<Vec<u8>> = conn.query(cmd, *timeout, "cache").await.ok()?;
                Arc::from(found?)
            }
        };
        let entry: Entry = serde_json::from_slice(&bytes).ok()?;
        // Only the gateway writes entries: one it could not have written
        // (a cost below zero would count as negative savings) is a miss.
        if entry.cost_pusd < 0 {
            return None;
        }
        let age = Duration::from_millis(now_ms().saturating_sub(entry.stored_at_ms));
        (age < ttl).then_some(entry)
    }

    /// Stores `entry` for `key` of `tenant` for `ttl` (best effort: a store
    /// that fails is a later miss). An entry whose answer is larger than
    /// `max_entry_bytes` is not stored; false then.
    pub async fn put(&self, tenant: &str, key: &Key, entry: &Entry, ttl: Duration) -> bool {
        let Ok(bytes) = serde_json::to_vec(entry) else {
            return false;
        };
        if bytes.len() > self.settings.max_entry_bytes {
            return false;
        }
        match &*self.store {
            Store::Local {
                entries,
                max_bytes,
                bytes: held,
            } => {
                let mut entries = entries.lock().unwrap_or_else(|e| e.into_inner());
                let mut held = held.lock().unwrap_or_else(|e| e.into_inner());
                let size = bytes.len();
                let local = Local {
                    bytes: Arc::from(bytes),
                    expires_at: Instant::now() + ttl,
                };
                if let Some((_, old)) = entries.push(*key, local) {
                    *held -= old.bytes.len();
                }
                *held += size;
                while *held > *max_bytes {
                    match entries.pop_lru() {
                        Some((_, old)) => *held -= old.bytes.len(),
                        None => break,
                    }
                }
                true
            }
            Store::Redis {
                conn,
                prefix,
                timeout,
            } => {
                let millis = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
                let mut cmd = redis::cmd("SET");
                cmd.arg(Self::redis_key(prefix, tenant, key))
                    .arg(bytes)
                    .arg("PX")
                    .arg(millis);
                conn.query::<()>(cmd, *timeout, "cache").await.is_ok()
            }
        }
    }

    /// Entries and bytes held in process (zero with Redis).
    pub fn local_size(&self) -> (usize, usize) {
        match &*self.store {
            Store::Local { entries, bytes, .. } => (
                entries.lock().unwrap_or_else(|e| e.into_inner()).len(),
                *bytes.lock().unwrap_or_else(|e| e.into_inner()),
            ),
            Store::Redis { .. } => (0, 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(size: usize) -> Entry {
        let answer = serde_json::json!({ "text": "x".repeat(size) });
        Entry {
            stored_at_ms: now_ms(),
            cost_pusd: 1,
            streamable: false,
            answer: serde_json::value::to_raw_value(&answer).unwrap(),
        }
    }

    #[tokio::test]
    async fn the_in_process_store_keeps_its_byte_bound_least_recently_used_out_first() {
        let settings = CacheSettings {
            max_entry_bytes: 2048,
            max_memory_bytes: 10 * 1024,
            ..CacheSettings::default()
        };
        let cache = Cache::new(settings, None);
        let ttl = Duration::from_secs(60);
        for i in 0..100u8 {
            assert!(cache.put("acme", &[i; 32], &entry(1000), ttl).await);
            // The first stays in use: never the least recently used.
            assert!(
                cache.get("acme", &[0; 32], ttl).await.is_some(),
                "after {i}"
            );
        }
        let (count, bytes) = cache.local_size();
        assert!(
            bytes <= 10 * 1024 && count >= 5,
            "{count} entries, {bytes} bytes"
        );
        assert!(
            cache.get("acme", &[1; 32], ttl).await.is_none(),
            "the oldest unused went"
        );
        assert!(cache.get("acme", &[99; 32], ttl).await.is_some());
        assert!(
            !cache.put("acme", &[7; 32], &entry(4096), ttl).await,
            "too large to store"
        );
    }

    #[tokio::test]
    async fn an_entry_the_gateway_could_not_have_written_is_a_miss() {
        let cache = Cache::new(CacheSettings::default(), None);
        let minute = Duration::from_secs(60);
        let mut negative = entry(10);
        negative.cost_pusd = -1;
        cache.put("acme", &[5; 32], &negative, minute).await;
        assert!(cache.get("acme", &[5; 32], minute).await.is_none());
        cache.put("acme", &[6; 32], &entry(10), minute).await;
        assert!(cache.get("acme", &[6; 32], minute).await.is_some());
    }

    #[tokio::test]
    async fn an_expired_entry_is_a_miss() {
        let cache = Cache::new(CacheSettings::default(), None);
        cache
            .put("acme", &[3; 32], &entry(10), Duration::ZERO)
            .await;
        let minute = Duration::from_secs(60);
        assert!(cache.get("acme", &[3; 32], minute).await.is_none());
        assert_eq!(cache.local_size(), (0, 0));
        // Stored under a long TTL, read under a shorter one: past it.
        let mut old = entry(10);
        old.stored_at_ms -= 120_000;
        let hour = Duration::from_secs(3600);
        cache.put("acme", &[4; 32], &old, hour).await;
        assert!(cache.get("acme", &[4; 32], hour).await.is_some());
        assert!(cache.get("acme", &[4; 32], minute).await.is_none());
    }
}
